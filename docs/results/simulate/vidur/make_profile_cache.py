"""Lay Vidur's own A100 profiling CSVs (github.com/microsoft/vidur, commit acb95f6, 2024-05-08,
data/profiling/a100/: CodeLlama-34B at TP2 on a 4xA100-80GB pairwise-NVLink node) out as the
Hugging Face dataset cache that vidur 0.0.26's SklearnExecutionTimePredictor reads with
snapshot_download (HF_HUB_OFFLINE=1). The CSVs are copied unchanged, only xz-compressed."""
import json, lzma, shutil, sys
from pathlib import Path

src = Path(sys.argv[1])        # data/profiling/a100 of that commit
cache = Path(sys.argv[2])      # the predictor's cache_dir
REV = "0" * 40
def dataset(kind, repo, files, config):
    root = cache / "profiling_data" / kind / f"datasets--{repo.replace('/', '--')}"
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    for f in files:
        with open(src / f"{f}.csv", "rb") as i, lzma.open(snap / f"{f}.csv.xz", "wb") as o:
            shutil.copyfileobj(i, o)
    (snap / "config.json").write_text(json.dumps(config))
    print(repo, "->", snap)

dataset("compute", "local/vidur-2024-05-codellama-34b-a100", ["mlp", "attention"],
        {"model": "codellama/CodeLlama-34b-Instruct-hf", "device_sku": "a100"})
dataset("network", "local/vidur-2024-05-a100-pairwise-nvlink", ["all_reduce", "send_recv"],
        {"sku": "a100_pairwise_nvlink"})
