"""mmengine's CheckpointHook, made safe to kill at any moment."""
import glob
import os
import os.path as osp
import re
from typing import List

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from apla_mm.registry import HOOKS

_TMP_SUFFIX = '.tmp'


def _fsync(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def write_atomic(path: str, text: str) -> None:
    """Write a small text file so that readers see the old or the new
    content, never a partial one (temp file + :func:`os.replace`)."""
    tmp = path + _TMP_SUFFIX
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """:class:`mmengine.hooks.CheckpointHook` whose saves survive a kill.

    mmengine 0.10.7 (``mmengine/hooks/checkpoint_hook.py``,
    ``_save_checkpoint_with_step``) first deletes the oldest checkpoint when
    ``max_keep_ckpts`` are kept, then writes the new file in place, then
    rewrites ``last_checkpoint``. A kill in between leaves a truncated file,
    a pointer to nothing, or -- with ``max_keep_ckpts=1`` -- no checkpoint at
    all. This hook saves in an order where every moment leaves a complete
    checkpoint that ``last_checkpoint`` (or ``tools/train.py --resume``)
    finds:

    1. the checkpoint is written to ``.<name>.tmp`` in the same folder,
       flushed to disk, and renamed to its name (:func:`os.replace` is
       atomic: the name holds the complete old file or the complete new one);
    2. ``last_checkpoint`` is replaced the same way;
    3. only then are checkpoints beyond ``max_keep_ckpts`` removed -- also
       older ``iter_N.pth``/``epoch_N.pth`` left behind by an earlier kill
       between steps 2 and 3 -- and stale ``.tmp`` files of an interrupted
       save.

    Arguments and behaviour are otherwise those of ``CheckpointHook`` (which
    it is a subclass of); ``tools/train.py`` uses it in place of
    ``CheckpointHook``. Saving to a non-local backend (``out_dir`` on a
    remote store, where renames are not atomic) falls back to mmengine's
    behaviour, with a warning.
    """

    def _is_local(self) -> bool:
        return isinstance(self.file_backend, LocalBackend)

    def _save_checkpoint_with_step(self, runner, step, meta):
        if not self._is_local():
            print_log(
                'SafeCheckpointHook: out_dir is not a local folder; saving '
                'with mmengine\'s CheckpointHook order (not kill-safe).',
                logger='current', level=30)
            return super()._save_checkpoint_with_step(runner, step, meta)
        to_remove: List[int] = []
        if self.max_keep_ckpts > 0 and not (
                self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            # The same bookkeeping as mmengine, but the file goes later.
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                to_remove.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = osp.join(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        tmp_filename = f'.{ckpt_filename}{_TMP_SUFFIX}'
        runner.save_checkpoint(
            self.out_dir,
            tmp_filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)
        if not is_main_process():
            return
        tmp_path = osp.join(self.out_dir, tmp_filename)
        _fsync(tmp_path)
        os.replace(tmp_path, self.last_ckpt)
        write_atomic(osp.join(runner.work_dir, 'last_checkpoint'),
                     self.last_ckpt)
        if self.max_keep_ckpts > 0:
            self._remove_old(to_remove)

    def _remove_old(self, steps: List[int]) -> None:
        """Remove checkpoints no longer kept and leftovers of a kill."""
        keep = set(self.keep_ckpt_ids)
        paths = [osp.join(self.out_dir, self.filename_tmpl.format(s))
                 for s in steps]
        if keep:
            # Older checkpoints of this run that a kill left behind.
            pattern = re.compile(
                re.escape(self.filename_tmpl).replace(r'\{\}', r'(\d+)')
                + '$')
            for path in glob.glob(osp.join(self.out_dir, '*')):
                m = pattern.match(osp.basename(path))
                if m and int(m.group(1)) < min(keep) \
                        and int(m.group(1)) not in keep:
                    paths.append(path)
        paths += glob.glob(osp.join(
            self.out_dir, '.' + self.filename_tmpl.format('*') + _TMP_SUFFIX))
        for path in dict.fromkeys(paths):
            if path == self.last_ckpt or not osp.isfile(path):
                continue
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
