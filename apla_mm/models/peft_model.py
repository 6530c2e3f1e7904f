"""A model adapted by a PEFT method at build time (``type='PEFTModel'``)."""
from typing import Optional, Union

import torch.nn as nn

from apla_mm.peft.base import adapter_class
from apla_mm.registry import MODELS


@MODELS.register_module()
def PEFTModel(model: Union[dict, nn.Module],
              method: str = 'apla',
              data_preprocessor: Optional[dict] = None,
              **settings) -> nn.Module:
    """Build ``model`` and apply a PEFT method to it, in place.

    The build-time entry point, in the spirit of mmpretrain's ``LoRAModel``:
    the optimizer, a DDP or FSDP wrapper (mmengine's ``FlexibleRunner``
    shards the model before any hook runs) and any other wrapper see the
    adapted model from the start::

        model = dict(type='PEFTModel', model=<the segmentor or detector>,
                     method='apla', rank=64, seed=0)
        custom_hooks = [dict(type='PEFTHook')]   # meta, resume, load guard

    It returns the model itself, not a wrapper around it: state-dict keys,
    the data preprocessor, ``test_step`` and the checkpoints are those of the
    plain model, so mmseg's and mmdet's own tools run it. The adapter is
    registered on the model (:func:`apla_mm.peft.get_adapter`).
    Training is the same as with the method's hook (``APLAHook``,
    ``LoRAHook``) for the same seed (``tests/test_peft_model.py``), except
    that mmengine's ``paramwise_cfg`` sees the adapter's parameters under
    their own names (``attn.proj.apla_weight``; a hook moves them into the
    place of the weight they adapt, with its settings).

    Args:
        model (dict | nn.Module): The model's config (or a built model).
        method (str): ``'apla'`` or ``'lora'`` (any registered method).
        data_preprocessor (dict, optional): Passed on to the model's config
            unless it has its own (mmengine's Runner gives the config's
            top-level ``data_preprocessor`` to the outermost model).
        **settings: The method's settings, documented on its config
            dataclass (:class:`~apla_mm.peft.APLAConfig`,
            :class:`~apla_mm.peft.LoRAConfig`).

    Returns:
        nn.Module: The built model, adapted.
    """
    try:
        cls = adapter_class(method)
    except ValueError as e:
        raise ValueError(f'PEFTModel: {e}'.replace(' in the checkpoint meta',
                                                   '')) from None
    config = cls.config_class.from_kwargs(f'PEFTModel(method={method!r})',
                                          **settings)
    if isinstance(model, dict):
        model = dict(model)
        if data_preprocessor is not None:
            model.setdefault('data_preprocessor', data_preprocessor)
        built = MODELS.build(model)
    else:
        built = model
    cls(built, config)
    return built
