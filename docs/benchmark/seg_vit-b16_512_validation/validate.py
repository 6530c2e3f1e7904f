"""Real vs abstract account, ViT-B/16 UperNet 512x512 batch 2."""
import json, sys, time, warnings
warnings.filterwarnings('ignore')
import torch
torch.set_num_threads(2)
import apla_mm
from apla_mm.benchmark.presets import preset_methods
from apla_mm.benchmark.trainee import Trainee
from apla_mm.benchmark.account import account_step, MB
methods = sys.argv[1].split(','); prec = sys.argv[2]; out = sys.argv[3]
amp = None if prec == 'fp32' else prec
specs, preset = preset_methods('seg', 'vit-b16', size=512, methods=methods, amp=amp)
res = {}
for spec in specs:
    row = {}
    for abstract in (True, False):
        t0 = time.time()
        t = Trainee(spec, 2, 512, amp=amp, abstract=abstract)
        a = account_step(t, top=40)
        a['seconds'] = time.time() - t0
        row['abstract' if abstract else 'real'] = a
        del t
    r, f = row['real'], row['abstract']
    print(spec.name, prec, 'real %.1f MB abstract %.1f MB rel diff %.2e (%.0fs / %.0fs)' % (
        r['total']/MB, f['total']/MB, (f['total']-r['total'])/r['total'], r['seconds'], f['seconds']), flush=True)
    res[spec.name] = row
    json.dump(dict(precision=prec, size=512, batch=2, torch=torch.__version__, methods=res), open(out, 'w'), indent=1, default=str)
