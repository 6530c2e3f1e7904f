from .timm_vit import TimmViT, load_local_state_dict

__all__ = ['TimmViT', 'load_local_state_dict']
