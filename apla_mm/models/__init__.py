from .backbones import *  # noqa: F401,F403
from .layers import *  # noqa: F401,F403
from .meta_adapter import *  # noqa: F401,F403
from .necks import *  # noqa: F401,F403
from .peft_model import PEFTModel  # noqa: F401
