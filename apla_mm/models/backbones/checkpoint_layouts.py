"""Published checkpoint layouts that timm's own filters do not read, and the
parts of a checkpoint that a dense-prediction backbone leaves out on purpose.

:class:`~apla_mm.models.TimmViT` reads a file in three steps:

1. :func:`convert_layout` maps a layout timm does not know to the layout of
   the family's original release, which timm's ``checkpoint_filter_fn``
   converts:

   * the Hugging Face ``transformers`` DINOv2 and DINOv2-with-registers
     layout (``facebook/dinov2-*``: ``embeddings.*``,
     ``encoder.layer.N.attention.attention.query.*``, ...) to Meta's
     torch-hub layout (``blocks.N.attn.qkv.*``, ``blocks.N.ls1.gamma``,
     ``register_tokens``, ...; ``facebookresearch/dinov2``,
     ``dinov2/models/vision_transformer.py``);
   * the ``transformers`` SAM layout (``facebook/sam-vit-*``:
     ``vision_encoder.layers.N.layer_norm1.*``, ``vision_encoder.neck.conv1``,
     ...) to Meta's ``sam_vit_*.pth`` layout (``image_encoder.blocks.N.*``;
     ``facebookresearch/segment-anything``,
     ``segment_anything/modeling/image_encoder.py``).

   It gives every block a copy of a BEiT pretraining file's shared relative
   position bias (:func:`expand_shared_rel_pos_bias`), and sets aside, by
   name, what a release holds on purpose for another task or that timm
   computes itself: SAM's prompt encoder and mask decoder, MAE's decoder,
   the text tower of a CLIP file, masked-image-modeling heads (BEiT,
   EVA-02), relative-position index and RoPE tables.
2. timm's ``checkpoint_filter_fn`` of the family (DINOv2 hub, open_clip,
   OpenAI CLIP, SAM, EVA-02, BEiT, DeiT-III layer scales, position and patch
   embedding resampling).
3. :func:`classify_unused` names each entry of the converted file the
   backbone does not load: a classifier/pooling head, the final norm and
   blocks after the last output (pruned by ``TimmViT``), a mask token.
   Entries it cannot name are reported as unrecognised.

Big-vision/AugReg ``.npz`` files are read by :func:`npz_state_dict` through
timm's own ``.npz`` reader (``VisionTransformer.load_pretrained``).
"""
import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

#: Groups of checkpoint entries a release holds on purpose for another task,
#: matched on the file's own key names: ``(description, pattern)``.
TASK_PARTS: Tuple[Tuple[str, 're.Pattern'], ...] = (
    ('SAM prompt encoder and mask decoder',
     re.compile(r'^(prompt_encoder|mask_decoder|shared_image_embedding)\.')),
    ('MAE decoder', re.compile(r'^decoder_(embed|pos_embed|blocks|norm|pred)'
                               r'\b')),
    ('masked-image-modeling head', re.compile(r'^(lm_head|cls_pt_layers)\.')),
    # Fixed tables the timm model computes itself (BEiT, EVA-02, Swin).
    ('fixed index/rotary tables (timm computes its own)',
     re.compile(r'(^|\.)(relative_position_index|rope\.freqs_(cos|sin))$')),
)
#: The text tower of an open_clip/OpenAI CLIP file (everything of the file
#: outside ``visual.``), named when the file has a ``visual.`` tower.
CLIP_TEXT = 'CLIP text tower and logit scale'
#: Entries a backbone does not use, matched on converted (timm) names.
_HEAD = re.compile(r'^(head|head_dist|fc_norm|pre_logits|attn_pool|'
                   r'classifier)(\.|$)')
_MASK_TOKEN = re.compile(r'^mask_token$')
MASK_TOKEN = 'mask token (masked-image pretraining)'
FINAL_NORM = ('final norm (pruned: output_norm=False; or the timm model '
              'pools through fc_norm and has none)')


@dataclass
class Layout:
    """A state dict ready for timm's ``checkpoint_filter_fn``.

    Attributes:
        name (str): The layout the file was recognised as.
        state_dict (dict): The entries for the backbone, in the layout of
            the family's original release (or timm's).
        task_parts (dict): Description to the file's own key names of the
            entries set aside on purpose (see :data:`TASK_PARTS`).
    """
    name: str
    state_dict: Dict[str, torch.Tensor]
    task_parts: Dict[str, List[str]] = field(default_factory=dict)


def _strip(state_dict: Mapping[str, torch.Tensor],
           prefix: str) -> Dict[str, torch.Tensor]:
    return {
        k[len(prefix):]: v
        for k, v in state_dict.items() if k.startswith(prefix)
    }


def _find_prefix(state_dict: Mapping[str, torch.Tensor],
                 suffix: str) -> Optional[str]:
    """The prefix in front of ``suffix`` in some key, or None."""
    for key in state_dict:
        if key.endswith(suffix):
            return key[:-len(suffix)]
    return None


def hf_dinov2_to_hub(state_dict: Mapping[str, torch.Tensor]
                     ) -> Dict[str, torch.Tensor]:
    """Map a ``transformers`` ``Dinov2Model``/``Dinov2WithRegistersModel``
    state dict (prefix already stripped) to Meta's torch-hub layout.

    transformers' modules (``transformers/models/dinov2/modeling_dinov2.py``):
    ``embeddings.{cls_token, mask_token, register_tokens,
    position_embeddings, patch_embeddings.projection}``,
    ``encoder.layer.N.{norm1, attention.attention.{query,key,value},
    attention.output.dense, layer_scale1.lambda1, norm2, mlp.{fc1,fc2} or
    mlp.{weights_in,weights_out} (SwiGLU), layer_scale2.lambda1}``,
    ``layernorm``. Meta's (``dinov2/models/vision_transformer.py`` and
    ``dinov2/layers/``): ``cls_token``, ``mask_token`` (shape ``(1, D)`` in
    both), ``register_tokens``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.{fc1,fc2}
    or mlp.{w12,w3}, ls2.gamma}``, ``norm``. The separate query, key and
    value projections are concatenated in that order into ``qkv``.
    """
    out: Dict[str, torch.Tensor] = {}
    embeddings = {
        'embeddings.cls_token': 'cls_token',
        'embeddings.mask_token': 'mask_token',
        'embeddings.register_tokens': 'register_tokens',
        'embeddings.position_embeddings': 'pos_embed',
        'embeddings.patch_embeddings.projection.weight':
        'patch_embed.proj.weight',
        'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
        'layernorm.weight': 'norm.weight',
        'layernorm.bias': 'norm.bias',
    }
    renames = (
        ('attention.output.dense.', 'attn.proj.'),
        ('layer_scale1.lambda1', 'ls1.gamma'),
        ('layer_scale2.lambda1', 'ls2.gamma'),
        ('mlp.weights_in.', 'mlp.w12.'),
        ('mlp.weights_out.', 'mlp.w3.'),
    )
    layer = re.compile(r'^encoder\.layer\.(\d+)\.(.*)$')
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in embeddings:
            out[embeddings[key]] = value
            continue
        match = layer.match(key)
        if match is None:
            out[key] = value  # e.g. a classifier; named or reported later
            continue
        index, rest = match.groups()
        part = re.match(r'^attention\.attention\.(query|key|value)\.'
                        r'(weight|bias)$', rest)
        if part is not None:
            qkv.setdefault((index, part.group(2)), {})[part.group(1)] = value
            continue
        for old, new in renames:
            rest = rest.replace(old, new)
        out[f'blocks.{index}.{rest}'] = value
    for (index, kind), parts in qkv.items():
        if set(parts) != {'query', 'key', 'value'}:
            raise KeyError(
                f'transformers DINOv2 checkpoint: layer {index} has only '
                f'{sorted(parts)} of its attention {kind}s (query, key and '
                'value expected); the file is incomplete.')
        out[f'blocks.{index}.attn.qkv.{kind}'] = torch.cat(
            [parts['query'], parts['key'], parts['value']], dim=0)
    return out


def hf_sam_to_meta(state_dict: Mapping[str, torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
    """Map the ``vision_encoder.*`` entries of a ``transformers``
    ``SamModel`` state dict to Meta's ``image_encoder.*`` layout.

    transformers (``transformers/models/sam/modeling_sam.py``):
    ``vision_encoder.{patch_embed.projection, pos_embed,
    layers.N.{layer_norm1, attn.{qkv, proj, rel_pos_h, rel_pos_w},
    layer_norm2, mlp.{lin1, lin2}}, neck.{conv1, layer_norm1, conv2,
    layer_norm2}}``. Meta (``segment_anything/modeling/image_encoder.py``):
    ``image_encoder.{patch_embed.proj, pos_embed, blocks.N.{norm1, attn.*,
    norm2, mlp.{lin1, lin2}}, neck.{0, 1, 2, 3}}``.
    """
    renames = (
        (re.compile(r'^patch_embed\.projection\.'), 'patch_embed.proj.'),
        (re.compile(r'^layers\.(\d+)\.layer_norm1\.'), r'blocks.\1.norm1.'),
        (re.compile(r'^layers\.(\d+)\.layer_norm2\.'), r'blocks.\1.norm2.'),
        (re.compile(r'^layers\.(\d+)\.'), r'blocks.\1.'),
        (re.compile(r'^neck\.conv1\.'), 'neck.0.'),
        (re.compile(r'^neck\.layer_norm1\.'), 'neck.1.'),
        (re.compile(r'^neck\.conv2\.'), 'neck.2.'),
        (re.compile(r'^neck\.layer_norm2\.'), 'neck.3.'),
    )
    out: Dict[str, torch.Tensor] = {}
    for key, value in _strip(state_dict, 'vision_encoder.').items():
        for pattern, new in renames:
            key, count = pattern.subn(new, key)
            if count:
                break
        out[f'image_encoder.{key}'] = value
    return out


def _set_aside(state_dict: Dict[str, torch.Tensor],
               parts: Dict[str, List[str]],
               description: str,
               keep: Callable[[str], bool]) -> Dict[str, torch.Tensor]:
    removed = [k for k in state_dict if not keep(k)]
    if removed:
        parts.setdefault(description, []).extend(removed)
    return {k: v for k, v in state_dict.items() if keep(k)}


def expand_shared_rel_pos_bias(state_dict: Dict[str, torch.Tensor],
                               model: nn.Module) -> bool:
    """Give every block a copy of a shared relative position bias table
    (BEiT/BEiT v2 pretraining files, ``rel_pos_bias.*``) when ``model`` has
    one table per block, as BEiT's own fine-tuning does
    (microsoft/unilm, ``beit2/run_class_finetuning.py``: the shared
    ``rel_pos_bias.relative_position_bias_table`` is cloned into
    ``blocks.N.attn.relative_position_bias_table``).

    Returns:
        bool: Whether the table was expanded.
    """
    key = 'rel_pos_bias.relative_position_bias_table'
    blocks = getattr(model, 'blocks', None)
    if key not in state_dict or getattr(model, 'rel_pos_bias', None) \
            is not None or not blocks or getattr(
                getattr(blocks[0], 'attn', None),
                'relative_position_bias_table', None) is None:
        return False
    table = state_dict.pop(key)
    depth = {
        int(m.group(1))
        for m in map(re.compile(r'^blocks\.(\d+)\.').match, state_dict) if m
    }
    for index in sorted(depth):
        state_dict[f'blocks.{index}.attn.relative_position_bias_table'] = \
            table.clone()
    return True


def convert_layout(state_dict: Mapping[str, torch.Tensor],
                   model: Optional[nn.Module] = None) -> Layout:
    """Recognise the layout of a (prefix-stripped) checkpoint, map the
    layouts timm does not read to the family's original layout, and set
    aside what the release holds for another task.

    Args:
        state_dict (Mapping): The file's entries (wrappers such as
            ``{'model': ...}`` already removed).
        model (nn.Module, optional): The timm model, for conversions that
            depend on its structure (BEiT's shared relative position bias).

    Returns:
        Layout: The entries for timm's ``checkpoint_filter_fn``.
    """
    sd = dict(state_dict)
    parts: Dict[str, List[str]] = {}
    name = 'timm or original release'
    dinov2 = _find_prefix(
        sd, 'encoder.layer.0.attention.attention.query.weight')
    if dinov2 is not None and \
            f'{dinov2}embeddings.patch_embeddings.projection.weight' in sd:
        name = 'transformers DINOv2' + (
            ' with registers'
            if f'{dinov2}embeddings.register_tokens' in sd else '')
        if dinov2:
            # e.g. 'dinov2.' of Dinov2ForImageClassification + 'classifier.'
            sd = _set_aside(sd, parts, 'classification head',
                            lambda k: k.startswith(dinov2))
            sd = _strip(sd, dinov2)
        sd = hf_dinov2_to_hub(sd)
    elif 'vision_encoder.patch_embed.projection.weight' in sd:
        name = 'transformers SAM'
        sd = _set_aside(sd, parts, TASK_PARTS[0][0],
                        lambda k: k.startswith('vision_encoder.'))
        sd = hf_sam_to_meta(sd)
    elif 'image_encoder.patch_embed.proj.weight' in sd:
        name = "Meta's SAM"
    elif any(k.startswith('visual.') for k in sd) and (
            'logit_scale' in sd or 'token_embedding.weight' in sd):
        name = 'open_clip / OpenAI CLIP'
        sd = _set_aside(sd, parts, CLIP_TEXT,
                        lambda k: k.startswith('visual.'))
    for description, pattern in TASK_PARTS:
        sd = _set_aside(sd, parts, description,
                        lambda k, p=pattern: p.search(k) is None)
    if model is not None and expand_shared_rel_pos_bias(sd, model):
        name += ', shared relative position bias copied to every block'
    if 'mask_token' in sd:
        # Kept: timm's filters recognise DINOv2 and EVA-02 MIM files by it
        # (and drop it).
        parts[MASK_TOKEN] = ['mask_token']
    return Layout(name, sd, parts)


def classify_unused(keys: Iterable[str], pruned: Iterable[str],
                    depth: int) -> Tuple[Dict[str, List[str]], List[str]]:
    """Name the converted entries the backbone does not load.

    Args:
        keys (Iterable[str]): Converted (timm) names the model has no entry
            for.
        pruned (Iterable[str]): Entries of the unpruned timm model that
            ``TimmViT`` removed (blocks after the last output, the final
            norm, the head).
        depth (int): Blocks the pruned model keeps.

    Returns:
        tuple: ``(named, unrecognised)``: description to keys, and the keys
        none of the descriptions fits.
    """
    pruned = set(pruned)
    named: Dict[str, List[str]] = {}
    unrecognised: List[str] = []
    block = re.compile(r'^blocks\.(\d+)\.')
    for key in sorted(keys):
        match = block.match(key)
        first = key.split('.', 1)[0]
        if match is not None and int(match.group(1)) >= depth:
            description = (f'blocks {depth} and later (after the last '
                           'output index)')
        elif first == 'neck' and key in pruned:
            description = 'SAM neck (pruned: output_norm=False)'
        elif first == 'norm':
            description = FINAL_NORM
        elif _HEAD.match(key) or key in pruned:
            description = 'classifier/pooling head'
        elif _MASK_TOKEN.match(key):
            description = MASK_TOKEN
        else:
            unrecognised.append(key)
            continue
        named.setdefault(description, []).append(key)
    return named, unrecognised


def summarise(keys: List[str], limit: int = 4) -> str:
    """``'a.*, b.* (12 tensors)'``: a short account of many key names, by
    their first two name components."""
    heads: List[str] = []
    for key in keys:
        parts = key.split('.')
        head = '.'.join(parts[:2]) + ('.*' if len(parts) > 2 else '')
        if head not in heads:
            heads.append(head)
    text = ', '.join(heads[:limit]) + (', ...' if len(heads) > limit else '')
    return f'{text} ({len(keys)} tensor{"s" if len(keys) != 1 else ""})'


def npz_state_dict(vit: nn.Module, path: str) -> Tuple[
        Dict[str, torch.Tensor], List[str]]:
    """Read a big_vision / AugReg ``.npz`` file into ``vit``'s own names.

    timm reads these files with the model's ``load_pretrained`` (for
    ``VisionTransformer``: ``timm.models.vision_transformer._load_weights``,
    which also resamples the position and patch embeddings). It copies into
    a model; here it copies into a copy of ``vit`` whose entries are first
    set to NaN, so the entries the file did not provide stay recognisable
    and are left out of the returned state dict.

    Args:
        vit (nn.Module): The (pruned) timm model.
        path (str): The ``.npz`` file.

    Returns:
        tuple: ``(state_dict, head_keys)``: the entries the file provided,
        and the file's own names of its classifier/pre-logits head, which a
        backbone does not use.
    """
    import numpy as np
    if not callable(getattr(vit, 'load_pretrained', None)):
        raise ValueError(
            f'{path!r} is a .npz (JAX/big_vision) file, which timm reads '
            f'only for VisionTransformer models, not {type(vit).__name__}. '
            'Use the .pth/.safetensors release of these weights.')
    target = copy.deepcopy(vit)
    with torch.no_grad():
        for tensor in target.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float('nan'))
        try:
            target.load_pretrained(path)
        except KeyError as e:
            raise KeyError(
                f'{path!r} lacks {e} that timm\'s .npz reader needs for '
                f'{type(vit).__name__}; is it a big_vision/AugReg ViT file of'
                ' this architecture (model_name, model_kwargs)?') from e
    state_dict = {
        k: v.clone()
        for k, v in target.state_dict().items()
        if not (v.is_floating_point() and torch.isnan(v).all())
    }
    with np.load(path) as npz:
        head = [
            k for k in npz.files
            if re.search(r'(^|/)(head|pre_logits|MAPHead_0)/', k)
        ]
    return state_dict, head
