"""A timm Vision Transformer (ViT, DINOv2, EVA-02, SAM, BEiT, ...) as a
multi-level dense-prediction backbone."""
import inspect
import logging
import os.path as osp
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule

from apla_mm.registry import MODELS


def _is_remote(path: str) -> bool:
    return '://' in path or path.startswith(('hf-hub:', 'hf_hub:', 'timm/'))


def _check_local(path: str) -> None:
    if _is_remote(path):
        raise ValueError(
            f'Pretrained weights are read from local files only, got {path!r}.'
            ' Download the file yourself (e.g. with `huggingface-cli '
            'download` or `wget`) and give its local path in '
            "init_cfg=dict(type='Pretrained', checkpoint='path/to/file').")
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'Pretrained checkpoint {path!r} does not exist. Give the local '
            "path of a .pth/.safetensors/.npz file in init_cfg['checkpoint']"
            '.')


#: Keys under which training scripts wrap the weights (mmengine, MAE, DeiT,
#: BEiT: ``model``; DeepSpeed, EVA: ``module``).
_WRAPPERS = ('state_dict', 'model', 'module')


def load_local_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from a local ``.pth``/``.pt``/``.bin``/
    ``.safetensors`` file (weights only, never from a hub).

    Checkpoints that wrap the weights in a ``state_dict``, ``model`` or
    ``module`` key (mmengine, MAE, DeiT, BEiT, EVA) are unwrapped and a
    ``module.`` prefix is removed. ``.npz`` files are read by
    :meth:`TimmViT.load_pretrained` (timm's reader needs the model).

    Args:
        path (str): Local file path.

    Returns:
        dict: Parameter name to tensor.
    """
    _check_local(path)
    if path.endswith('.npz'):
        raise ValueError(
            f'{path!r} is a .npz (JAX/big_vision) file: load it with '
            "TimmViT(init_cfg=dict(type='Pretrained', checkpoint=...)), "
            "or convert it for mmseg's VisionTransformer with mmseg's "
            'tools/model_converters/vitjax2mmseg.py.')
    from timm.models import load_state_dict
    state_dict = load_state_dict(path, use_ema=False, weights_only=True)
    for _ in range(2):  # e.g. {'model': {'module': ...}}
        wrapped = [k for k in _WRAPPERS if isinstance(state_dict.get(k), dict)]
        if not wrapped:
            break
        state_dict = state_dict[wrapped[0]]
    return state_dict


#: Optional ``timm.create_model`` arguments TimmViT adds itself; families
#: whose constructor lacks one are built without it (SAM and BEiT have no
#: ``dynamic_img_size``: SAM resamples its position embedding per input
#: anyway, BEiT needs inputs of its ``img_size``).
_OPTIONAL_KWARGS = {'dynamic_img_size': True}


def _unexpected_kwarg(error: TypeError) -> Optional[str]:
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    return match.group(1) if match else None


def create_timm_vit(model_name: str, model_kwargs: Optional[dict] = None):
    """``timm.create_model(model_name, pretrained=False, ...)`` for any timm
    ViT-like family, with ``dynamic_img_size=True`` where it is accepted.

    Arguments the user gives in ``model_kwargs`` are passed as they are; of
    the ones TimmViT adds (:data:`_OPTIONAL_KWARGS`) only those the family's
    constructor accepts are kept.
    """
    import timm
    user = dict(model_kwargs or {})
    kwargs = dict(_OPTIONAL_KWARGS)
    kwargs.update(user)
    while True:
        try:
            return timm.create_model(model_name, pretrained=False, **kwargs)
        except TypeError as e:
            name = _unexpected_kwarg(e)
            if name is None or name in user or name not in kwargs:
                raise TypeError(
                    f'Could not build timm model {model_name!r} with '
                    f'{kwargs}: {e}. TimmViT needs the name of a timm ViT-like '
                    "model (timm.list_models('vit_*'), 'eva02_*', 'samvit_*',"
                    " 'deit3_*', 'beitv2_*', ...) and arguments its "
                    'constructor accepts.') from e
            kwargs.pop(name)


@MODELS.register_module()
class TimmViT(BaseModule):
    """Any timm ViT-like model as a backbone returning NCHW maps.

    Works with every timm family that offers ``forward_intermediates`` and
    ``prune_intermediate_layers``: ``VisionTransformer`` (DeiT, DeiT-III,
    AugReg, DINOv2 with or without registers, SigLIP, CLIP), ``Eva``
    (EVA-02), ``VisionTransformerSAM`` (SAM's image encoder) and ``Beit``
    (BEiT v2). The model is built with ``timm.create_model(model_name,
    pretrained=False, dynamic_img_size=True, **model_kwargs)``
    (:func:`create_timm_vit`; ``dynamic_img_size`` only where the family
    accepts it), so inputs of any size divisible by the patch size work (the
    position embedding is resampled per input; SAM does so itself; BEiT's
    relative position tables need inputs of its ``img_size``). Patch-14
    models (DINOv2, EVA-02) need inputs that are a multiple of 14, e.g. a
    518x518 crop instead of 512x512 (see the DINOv2/EVA-02 configs). Blocks
    after the last requested output, the classifier head and (unless
    ``output_norm``) the final norm (SAM: its neck) are pruned away.

    Parameters keep timm's names under ``vit.``, e.g.
    ``backbone.vit.blocks.3.attn.proj.weight`` inside a segmentor, so timm
    checkpoints load unchanged and APLA's target patterns find ``attn.proj``.

    Args:
        model_name (str): A timm model name, e.g. ``'vit_base_patch16_224'``,
            ``'vit_base_patch14_dinov2'``, ``'eva02_base_patch14_224'``,
            ``'samvit_base_patch16'``. Architecture arguments in
            ``model_kwargs`` override the name's defaults (``embed_dim``,
            ``depth``, ``num_heads``, ``patch_size``, ``img_size``,
            ``drop_path_rate``, ...).
        out_indices (Sequence[int]): Blocks whose outputs are returned, in
            order; negative values count from the last block.
            Defaults to the last block.
        output_norm (bool): Apply the final LayerNorm to every output.
            Defaults to False.
        frozen (bool): Freeze every parameter (the frozen-backbone baseline).
            Defaults to False.
        with_cp (bool): Recompute block activations in backward (timm's
            gradient checkpointing). Defaults to False.
        model_kwargs (dict, optional): Extra arguments for
            ``timm.create_model``.
        init_cfg (dict, optional): ``dict(type='Pretrained',
            checkpoint='local/file.pth', prefix=None)`` loads a local
            ``.pth``/``.safetensors``/``.npz`` file in any published layout
            of the family (:meth:`load_pretrained`, ``docs/weights.md``):
            timm's, the original releases (through the family's own
            ``checkpoint_filter_fn``, with position-embedding and
            patch-embedding resampling), big_vision ``.npz`` files and the
            ``transformers`` DINOv2/SAM layouts. ``prefix`` keeps only keys
            starting with it and strips it (e.g. ``'backbone.vit.'`` to read
            a checkpoint of a whole segmentor). Nothing is ever downloaded.
    """

    def __init__(self,
                 model_name: str = 'vit_base_patch16_224',
                 out_indices: Union[int, Sequence[int]] = (-1, ),
                 output_norm: bool = False,
                 frozen: bool = False,
                 with_cp: bool = False,
                 model_kwargs: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        vit = create_timm_vit(model_name, model_kwargs)
        missing = [
            attr for attr in ('forward_intermediates',
                              'prune_intermediate_layers', 'blocks',
                              'patch_embed') if not hasattr(vit, attr)
        ]
        if missing:
            raise TypeError(
                f'TimmViT needs a timm ViT-like model with '
                f'forward_intermediates (VisionTransformer, Eva, '
                f'VisionTransformerSAM, Beit), but {model_name!r} builds a '
                f'{type(vit).__name__} without {missing}. Use e.g. '
                "'vit_base_patch16_224', 'eva02_base_patch14_224' or "
                "'samvit_base_patch16'.")
        depth = len(vit.blocks)
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        indices = []
        for index in out_indices:
            absolute = index + depth if index < 0 else index
            if not 0 <= absolute < depth:
                raise ValueError(f'out_indices {tuple(out_indices)} out of '
                                 f'range for a ViT with {depth} blocks.')
            indices.append(absolute)
        if len(set(indices)) != len(indices):
            raise ValueError(f'out_indices {tuple(out_indices)} repeat a '
                             'block.')
        self.out_indices: Tuple[int, ...] = tuple(indices)
        self.output_norm = output_norm
        self.model_name = model_name
        full_keys = set(vit.state_dict())
        vit.prune_intermediate_layers(
            list(self.out_indices), prune_norm=not output_norm,
            prune_head=True)
        self.vit = vit
        # Names of what pruning removed: a checkpoint's entries for them are
        # left out on purpose (named in the load log).
        self._pruned_keys = frozenset(full_keys - set(vit.state_dict()))
        #: What the last :meth:`load_pretrained` loaded and left out.
        self.pretrained_report: Optional[dict] = None
        self.embed_dim: int = vit.embed_dim
        self.patch_size: Tuple[int, int] = tuple(vit.patch_embed.patch_size)
        self.frozen = frozen
        if with_cp:
            vit.set_grad_checkpointing(True)
        if frozen:
            self.requires_grad_(False)

    def init_weights(self) -> None:
        """Load ``init_cfg['checkpoint']`` or keep timm's initialisation."""
        cfg = self.init_cfg or {}
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
            self._is_init = True
            return
        # timm initialised the weights at construction; BaseModule would call
        # VisionTransformer.init_weights again with another random draw.
        self._is_init = True

    def load_pretrained(self,
                        path: str,
                        prefix: Optional[str] = None) -> List[str]:
        """Load weights from a local file into the ViT.

        Reads the family's published layouts (``docs/weights.md``):
        timm's own files, the original releases timm's
        ``checkpoint_filter_fn`` converts (DINOv2 torch hub, SAM, EVA-02,
        BEiT, MAE, DeiT/DeiT-III, open_clip/OpenAI CLIP), big_vision/AugReg
        ``.npz`` files, and the Hugging Face ``transformers`` DINOv2 and SAM
        layouts (:mod:`~apla_mm.models.backbones.checkpoint_layouts`). The
        log names what the file holds and the backbone leaves out on
        purpose (a decoder, a text tower, a head, pruned blocks); entries it
        cannot name and entries missing from the file are logged as
        warnings and reported to a PEFT run's load guard.

        Args:
            path (str): ``.pth``/``.pt``/``.bin``/``.safetensors``/``.npz``
                file.
            prefix (str, optional): Keep only keys starting with ``prefix``
                and strip it (not for ``.npz``).

        Returns:
            list[str]: ViT parameter names the file did not provide.
        """
        from .checkpoint_layouts import (Layout, classify_unused,
                                         convert_layout, npz_state_dict,
                                         summarise)
        if path.endswith('.npz'):
            _check_local(path)
            state_dict, head = npz_state_dict(self.vit, path)
            layout = Layout('big_vision/AugReg .npz', state_dict,
                            {'classifier/pooling head': head} if head else {})
        else:
            raw = load_local_state_dict(path)
            if prefix:
                raw = {
                    k[len(prefix):]: v
                    for k, v in raw.items() if k.startswith(prefix)
                }
            layout = convert_layout(raw, self.vit)
            state_dict = layout.state_dict
            filter_fn = getattr(
                sys.modules[type(self.vit).__module__], 'checkpoint_filter_fn',
                None)
            if filter_fn is not None and state_dict:
                kwargs = {}
                if 'adapt_layer_scale' in inspect.signature(
                        filter_fn).parameters:
                    # DeiT-III's gamma_1/gamma_2 (timm passes this for its
                    # deit3 models only; no other ViT file has gamma_*).
                    kwargs['adapt_layer_scale'] = True
                state_dict = filter_fn(state_dict, self.vit, **kwargs)
        own = self.vit.state_dict()
        if 'norm.weight' in own and 'norm.weight' not in state_dict and \
                'fc_norm.weight' in state_dict and \
                'fc_norm.weight' not in own:
            # timm's EVA filter moves a masked-image-modeling file's final
            # norm to fc_norm for classification; a backbone with the
            # final norm (output_norm=True) takes it back.
            for name in ('weight', 'bias'):
                state_dict[f'norm.{name}'] = state_dict.pop(f'fc_norm.{name}')
        matched = [k for k in state_dict if k in own]
        if not matched:
            raise KeyError(
                f'No key of {path!r} matches the timm model {self.model_name!r}'
                f' (checkpoint keys look like {list(state_dict)[:3]}; read as '
                f'layout {layout.name!r}). Set init_cfg[\'prefix\'] to the '
                "prefix in front of the ViT's keys, or see docs/weights.md for"
                ' the layouts TimmViT reads.')
        for key in matched:
            if state_dict[key].shape != own[key].shape:
                raise ValueError(
                    f'{key}: checkpoint shape {tuple(state_dict[key].shape)} '
                    f'!= model shape {tuple(own[key].shape)}; do model_name '
                    'and model_kwargs describe the checkpoint\'s architecture?')
        named, unrecognised = classify_unused(
            [k for k in state_dict if k not in own], self._pruned_keys,
            len(self.vit.blocks))
        left_out = {k for keys in named.values() for k in keys}
        # Tell a PEFT hook's load guard what this load leaves out on purpose;
        # anything else missing stops a PEFT run.
        from apla_mm.utils.load_guard import record_pretrained_load
        record_pretrained_load(
            self.vit, state_dict, source=path,
            ignore_unexpected=left_out.__contains__)
        result = self.vit.load_state_dict(
            {k: state_dict[k] for k in matched}, strict=False)
        missing = list(result.missing_keys)
        on_purpose = {k: list(v) for k, v in layout.task_parts.items()}
        for what, keys in named.items():
            known = on_purpose.setdefault(what, [])
            known.extend(k for k in keys if k not in known)
        self.pretrained_report = dict(
            layout=layout.name, loaded=sorted(matched), missing=missing,
            on_purpose=on_purpose, unrecognised=unrecognised)
        lines = [f'TimmViT: loaded {len(matched)} tensors from {path} '
                 f'(layout: {layout.name}).']
        if on_purpose:
            lines.append('Not used, on purpose: ' + '; '.join(
                f'{what}: {summarise(keys)}'
                for what, keys in on_purpose.items()) + '.')
        print_log(' '.join(lines), logger='current')
        problems = []
        if missing:
            problems.append(f'missing in the file (left at their random '
                            f'initialisation): {missing}')
        if unrecognised:
            problems.append('entries of the file that match nothing of the '
                            f'model and are not loaded: {unrecognised}')
        if problems:
            print_log(
                f'TimmViT: {path} did not load completely: '
                + '; '.join(problems) + '. Check model_name/model_kwargs '
                'against the checkpoint (docs/weights.md).',
                logger='current', level=logging.WARNING)
        return missing

    def patch_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """The ``(H/p, W/p)`` token grid of an input batch; a clear error if
        the input size is not a multiple of the patch size."""
        h, w = x.shape[-2:]
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(
                f'Input size {h}x{w} is not divisible by the patch size '
                f'{ph}x{pw}; pad the input (e.g. the data preprocessor\'s '
                'size_divisor) to a multiple of it.')
        return h // ph, w // pw

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return the requested blocks' tokens as ``(B, C, H/p, W/p)`` maps."""
        self.patch_grid(x)
        outs = self.vit.forward_intermediates(
            x,
            indices=list(self.out_indices),
            norm=self.output_norm,
            output_fmt='NCHW',
            intermediates_only=True)
        return tuple(outs)

    def train(self, mode: bool = True) -> 'TimmViT':
        super().train(mode)
        if self.frozen:
            # A frozen backbone behaves as at inference (no dropout/droppath).
            self.vit.eval()
        return self
