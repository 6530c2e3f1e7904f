"""Checkpoints that are verified before they are used.

``torch.load`` does not check the CRC-32 sums its zip archives carry: a
checkpoint with flipped bytes loads, and evaluates to garbage. mmengine then
loads a state dict non-strictly and only prints what did not match, so the
checkpoint of another model evaluates too. Our tools (``tools/train.py``
``--resume``/``load_from``, ``tools/test.py``, the delta tools) therefore

* verify a file before reading it (:func:`verify_checkpoint_file`): it
  exists, is not empty, is not a text file, and every member of its zip
  archive matches its CRC (:meth:`zipfile.ZipFile.testzip`, the check torch
  skips);
* read it with torch's weights-only unpickler and say what was refused
  without advising to turn the check off (:func:`load_checkpoint_file`);
* compare its state dict with the model's (:func:`check_state_dict_match`):
  a checkpoint that matches nothing, or only part of the model, is an error
  naming the counts and examples, unless partial loading is asked for;
* pick the checkpoint a ``--resume`` continues from
  (:func:`find_resume_checkpoint`): the newest one that verifies.
"""
import glob
import os
import os.path as osp
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple


from apla_mm.compat import load_weights_only

#: Start of a pre-1.6 (non-zip) ``torch.save`` file: pickle protocol 2 and
#: torch's magic number. Such files carry no checksums.
_LEGACY_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'
_CHECKPOINT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or not a checkpoint."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's state dict does not fit the model."""


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in '\r\n\t' for c in text)


def verify_checkpoint_file(path: str) -> None:
    """Check that ``path`` is an intact PyTorch checkpoint file.

    Reads the whole file once (the zip CRC check); for a ViT-B checkpoint of
    ~400 MB this takes about a second.

    Args:
        path (str): Local file.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Empty, text, truncated, not a torch file, or a
            member whose data do not match its CRC-32.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'Checkpoint {path!r} does not exist.')
    size = osp.getsize(path)
    if size == 0:
        raise CheckpointError(
            f'Checkpoint {path!r} is empty (0 bytes): a save that was '
            'interrupted, or a placeholder. Use another checkpoint (tools/'
            'train.py --resume picks the newest intact one by itself).')
    with open(path, 'rb') as f:
        head = f.read(512)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(
                f'Checkpoint {path!r} is damaged ({e}); its zip archive '
                'cannot be read. Use another checkpoint or re-create it.'
            ) from e
        if bad is not None:
            raise CheckpointError(
                f'Checkpoint {path!r} is damaged: the data of {bad!r} do not '
                'match their CRC-32 checksum (corrupted on disk or in '
                'transfer). Loading it would give wrong weights; use another '
                'checkpoint or copy it again.')
        return
    if head.startswith(_LEGACY_MAGIC):
        return  # old torch format: nothing to verify against
    if head.startswith(b'PK\x03\x04'):
        raise CheckpointError(
            f'Checkpoint {path!r} is truncated ({size:,} bytes, the end of '
            'its zip archive is missing): a save that was interrupted. Use '
            'another checkpoint (tools/train.py --resume picks the newest '
            'intact one by itself).')
    if _looks_like_text(head):
        first = head.decode('utf-8').strip().splitlines()[0][:60] \
            if head.strip() else ''
        raise CheckpointError(
            f'{path!r} is a text file (starts with {first!r}), not a '
            'checkpoint. Give the path of a .pth file written by torch.save '
            '(e.g. work_dirs/<run>/iter_600.pth).')
    raise CheckpointError(
        f'{path!r} is not a PyTorch checkpoint (neither a zip archive nor '
        'the legacy format): damaged, or a file of another kind.')


def load_checkpoint_file(path: str, map_location='cpu') -> dict:
    """:func:`verify_checkpoint_file`, then ``torch.load`` weights only.

    ``import apla_mm`` has added mmengine's log buffers and numpy values to
    the weights-only allowlist, so mmengine checkpoints load; anything else
    that is not tensors and plain values is refused.

    Raises:
        CheckpointError: As :func:`verify_checkpoint_file`, or when the
            weights-only unpickler refuses the file.
    """
    verify_checkpoint_file(path)
    try:
        return load_weights_only(path, map_location=map_location)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f'Cannot read checkpoint {path!r} safely: {_refusal(e)}. '
            'apla_mm reads checkpoints with the weights-only loader, which '
            'accepts tensors, plain Python values and mmengine\'s own log '
            'objects. Save the weights as a plain dict of tensors (e.g. '
            "torch.save({'state_dict': model.state_dict()}, path)) with the "
            'code that wrote this file.') from e


def _refusal(error: BaseException) -> str:
    """The reason torch gives, without its advice to disable the check."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in lines:
        if 'Unsupported global' in line or 'WeightsUnpickler error' in line:
            return line.rstrip('.')
    for line in lines:
        if 'weights_only' not in line and 'Weights only load failed' \
                not in line:
            return line.rstrip('.')
    return type(error).__name__


# -- state-dict matching ----------------------------------------------------
@dataclass
class StateDictMatch:
    """How a checkpoint's state dict fits a model's."""
    matched: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 3) -> str:
        parts = []
        for label, keys in (('missing in the checkpoint', self.missing),
                            ('not in the model', self.unexpected)):
            if keys:
                parts.append(f'{len(keys)} {label} (e.g. '
                             f'{", ".join(keys[:limit])})')
        if self.mismatched:
            examples = ', '.join(f'{k}: checkpoint {tuple(a)} vs model '
                                 f'{tuple(b)}'
                                 for k, a, b in self.mismatched[:limit])
            parts.append(f'{len(self.mismatched)} of another shape '
                         f'(e.g. {examples})')
        return '; '.join(parts)


def _shape(value) -> Optional[tuple]:
    return tuple(value.shape) if hasattr(value, 'shape') else None


def state_dict_of(checkpoint: Mapping) -> Mapping:
    """The state dict inside an mmengine checkpoint (or the dict itself),
    with mmengine's default ``module.`` prefix removal applied."""
    state = checkpoint.get('state_dict', checkpoint)
    if any(k.startswith('module.') for k in state):
        state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
    return state


def match_state_dicts(model_state: Mapping,
                      checkpoint_state: Mapping) -> StateDictMatch:
    """Compare keys and shapes (BatchNorm ``num_batches_tracked`` counters
    missing from a checkpoint are ignored, as mmengine does)."""
    result = StateDictMatch()
    for key, value in model_state.items():
        if key not in checkpoint_state:
            if not key.endswith('num_batches_tracked'):
                result.missing.append(key)
            continue
        mine, theirs = _shape(value), _shape(checkpoint_state[key])
        if mine != theirs:
            result.mismatched.append((key, theirs, mine))
        else:
            result.matched.append(key)
    result.unexpected = [k for k in checkpoint_state if k not in model_state]
    return result


def check_state_dict_match(model_state: Mapping,
                           checkpoint_state: Mapping,
                           source: str,
                           allow_partial: bool = False,
                           option: str = '--allow-partial-checkpoint'
                           ) -> StateDictMatch:
    """Refuse a checkpoint that does not fit the model.

    Args:
        model_state (Mapping): The model's state dict (values need only a
            ``shape``).
        checkpoint_state (Mapping): The checkpoint's state dict.
        source (str): The checkpoint's name, for messages.
        allow_partial (bool): Accept a partial match (missing, extra or
            reshaped entries) as long as something matches.
        option (str): How the user asks for ``allow_partial``, named in the
            error.

    Returns:
        StateDictMatch: The comparison.

    Raises:
        CheckpointMismatchError: Nothing matches, or (without
            ``allow_partial``) not everything does.
    """
    result = match_state_dicts(model_state, checkpoint_state)
    total = len(result.matched) + len(result.missing) + len(result.mismatched)
    if result.complete:
        return result
    counts = (f'{len(result.matched)} of the model\'s {total} entries match '
              f'(checkpoint: {len(checkpoint_state)} entries)')
    if not result.matched:
        raise CheckpointMismatchError(
            f'Checkpoint {source!r} does not belong to this model: {counts}; '
            f'{result.describe()}. Is it a checkpoint of another config '
            '(e.g. a detector for a segmentation config)? Give a checkpoint '
            'of this model.')
    if allow_partial:
        return result
    barely = len(result.matched) < 0.5 * total
    raise CheckpointMismatchError(
        f'Checkpoint {source!r} ' +
        ('barely overlaps the model' if barely else 'fits the model only '
         'partly') + f': {counts}; {result.describe()}. Entries that do not '
        'load keep their initial values, so the results would be silently '
        'wrong. Use a checkpoint of this config, or pass '
        f'{option} if a partial load is intended (e.g. another head).')


# -- resuming -------------------------------------------------------------
def checkpoint_step(path: str) -> Optional[Tuple[str, int]]:
    """``('iter', 600)`` for ``.../iter_600.pth``, None for other names."""
    m = _CHECKPOINT_NAME.match(osp.basename(path))
    return (m.group(1), int(m.group(2))) if m else None


def list_checkpoints(work_dir: str) -> List[str]:
    """``iter_N.pth``/``epoch_N.pth`` in ``work_dir``, newest step first."""
    found = [p for p in glob.glob(osp.join(work_dir, '*.pth'))
             if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p)[1], reverse=True)


@dataclass
class ResumeChoice:
    """The result of :func:`find_resume_checkpoint`."""
    #: The checkpoint to resume from (None: nothing to resume).
    path: Optional[str]
    #: Newer files that did not verify, with the reason.
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    #: What ``last_checkpoint`` said (None when absent or empty).
    pointer: Optional[str] = None


def read_last_checkpoint(work_dir: str) -> Optional[str]:
    """The path in ``work_dir/last_checkpoint`` (None if absent/empty)."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None
    with open(pointer) as f:
        text = f.read().strip()
    return text or None


def find_resume_checkpoint(work_dir: str) -> ResumeChoice:
    """The newest checkpoint in ``work_dir`` that verifies.

    Candidates are the file ``last_checkpoint`` names (if it exists) and
    every ``iter_N.pth``/``epoch_N.pth`` in the work dir; they are tried
    newest step first with :func:`verify_checkpoint_file`.

    Returns:
        ResumeChoice: ``path`` None when there is no checkpoint at all.

    Raises:
        CheckpointError: Checkpoints exist but none verifies (listing each
            file and why).
    """
    pointer = read_last_checkpoint(work_dir)
    candidates = list_checkpoints(work_dir)
    if pointer is not None:
        if osp.isfile(pointer) and osp.abspath(pointer) not in map(
                osp.abspath, candidates):
            candidates.insert(0, pointer)
    skipped: List[Tuple[str, str]] = []
    for path in candidates:
        try:
            verify_checkpoint_file(path)
        except (CheckpointError, FileNotFoundError) as e:
            skipped.append((path, str(e)))
            continue
        return ResumeChoice(path, skipped, pointer)
    if skipped:
        details = '\n'.join(f'  {p}: {why}' for p, why in skipped)
        raise CheckpointError(
            f'--resume: none of the {len(skipped)} checkpoints in '
            f'{work_dir!r} is intact:\n{details}\nNothing was overwritten. '
            'Restore a checkpoint into the work dir, or start a new run '
            'in another --work-dir (or delete these files).')
    return ResumeChoice(None, skipped, pointer)


def checkpoint_meta(path: str) -> Dict:
    """The ``meta`` dict of a verified checkpoint (loaded memory-mapped, so
    the tensors are not read)."""
    verify_checkpoint_file(path)
    try:
        ckpt = load_weights_only(path, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f'Cannot read checkpoint {path!r} safely: '
                              f'{_refusal(e)}.') from e
    return dict(ckpt.get('meta', {})) if isinstance(ckpt, dict) else {}


def remove_files(paths: Sequence[str]) -> None:
    """Remove files that exist; ignore those that do not."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
