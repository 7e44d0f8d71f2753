"""`python benchmarks/closed_form_checks.py DATA/CATEGORY on|off`: closed-form checks on a LOCO-layout category: the component check alone, the patch memory alone, and both fused
(pixelwise max of their log-odds maps, top-K mean), image AUROC logical / structural. SLSG's own map is left out
(no trained network within the session's CPU budget)."""
import sys, time, json, numpy as np, torch
from pathlib import Path
from PIL import Image
from slsg_train.models import SLSG, preset, top_k_for_size
from slsg_train.models.slsg import image_score_log_odds
from slsg_train.training.calibration import fit_checks
from slsg_train.training.dataset import to_tensor
torch.manual_seed(0)
root, component = Path(sys.argv[1]), sys.argv[2] == "on"


def load(folder):
    return [np.asarray(Image.open(p).convert('RGB')) for p in sorted((root / folder).glob('*.png'))]



train, calib = load('train/good'), load('validation/good')
good, logical, structural = load('test/good'), load('test/logical_anomalies'), load('test/structural_anomalies')
model = SLSG(preset('default', composition_check=False, component_check=component))
size = train[0].shape[:2]; k = top_k_for_size(*size)
t = time.time(); rep = fit_checks(model, train, calib, top_k=k, progress=False); fit_s = time.time() - t
model.eval()
def scores(ims):
    out = {c.name: [] for c in model.checks}; out['fused'] = []
    with torch.no_grad():
        for i in range(0, len(ims), 16):
            x = torch.stack([to_tensor(im) for im in ims[i:i+16]])
            maps = model.reference_encoder(x)
            logs = []
            for c in model.checks:
                raw = c(x, maps); lo = c.log_odds(raw, size); logs.append(lo)
                out[c.name].append(image_score_log_odds(lo, k))
            out['fused'].append(image_score_log_odds(torch.stack(logs).amax(0), k))
    return {n: torch.cat(v).numpy() for n, v in out.items()}
def auroc(neg, pos):
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())
g, l, s = scores(good), scores(logical), scores(structural)
res = {n: {"logical": round(auroc(g[n], l[n]), 3), "structural": round(auroc(g[n], s[n]), 3)} for n in g}
print(json.dumps({"data": str(root), "component_check": component, "fit_s": round(fit_s), "auroc": res,
                  "component_report": rep.get("component_check")}))
