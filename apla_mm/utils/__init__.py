from .checkpoint_compat import (mmengine_safe_globals,
                                register_checkpoint_safe_globals)
from .checkpoint_io import (CheckpointError, CheckpointMismatchError,
                            check_state_dict_match, find_resume_checkpoint,
                            load_checkpoint_file, verify_checkpoint_file)
from .load_guard import (IncompletePretrainedLoadError,
                         PretrainedLoadRecorder, check_frozen_pretrained)

__all__ = [
    'CheckpointError', 'CheckpointMismatchError',
    'IncompletePretrainedLoadError', 'PretrainedLoadRecorder',
    'check_frozen_pretrained', 'check_state_dict_match',
    'find_resume_checkpoint', 'load_checkpoint_file',
    'mmengine_safe_globals', 'register_checkpoint_safe_globals',
    'verify_checkpoint_file'
]
