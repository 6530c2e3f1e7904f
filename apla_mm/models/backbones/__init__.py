from .meta_adapter import METAAdapterViT
from .timm_vit import TimmViT, load_local_state_dict

__all__ = ['METAAdapterViT', 'TimmViT', 'load_local_state_dict']
