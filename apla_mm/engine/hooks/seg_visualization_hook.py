"""mmseg's visualization hook, made usable in test-only runs."""
import os.path as osp
from typing import Sequence

import mmcv
import mmengine.fileio as fileio
from mmengine.runner import Runner
from mmseg.engine.hooks import SegVisualizationHook
from mmseg.structures import SegDataSample

from apla_mm.registry import HOOKS


@HOOKS.register_module()
class SegTestVisualizationHook(SegVisualizationHook):
    """:class:`mmseg.engine.hooks.SegVisualizationHook` that draws test
    predictions without touching the training loop.

    mmseg 1.2.2's hook passes ``step=runner.iter`` when it draws a test
    prediction (``mmseg/engine/hooks/visualization_hook.py``). In a test-only
    run ``runner.iter`` builds the training loop and with it the *training*
    dataloader, so ``tools/test.py --show-dir`` fails unless the training
    data exist (and is slow when they do). This hook counts drawn test
    batches itself, as mmdet's ``DetVisualizationHook`` does; validation
    during training is unchanged. ``tools/test.py --show/--show-dir`` selects
    it in place of mmseg's hook; the arguments are the same.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._test_index = 0

    def after_test_iter(self, runner: Runner, batch_idx: int,
                        data_batch: dict,
                        outputs: Sequence[SegDataSample]) -> None:
        """Draw (and save) the predictions of every ``interval``-th test
        batch."""
        if self.draw is False:
            return
        if self.every_n_inner_iters(batch_idx, self.interval):
            for output in outputs:
                img_bytes = fileio.get(
                    output.img_path, backend_args=self.backend_args)
                img = mmcv.imfrombytes(img_bytes, channel_order='rgb')
                self._visualizer.add_datasample(
                    f'test_{osp.basename(output.img_path)}',
                    img,
                    data_sample=output,
                    show=self.show,
                    wait_time=self.wait_time,
                    step=self._test_index)
        self._test_index += 1
