"""A one-layer random-weight model with llama-30m's tokenizer: it stands in for the real
model when the step times are emulated (serve_emulated.py), so the CPU's own compute per
step (a few ms) stays well under the emulated step.

    python tiny_model.py /work/models/llama-30m OUT_DIR
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

source, out = Path(sys.argv[1]), Path(sys.argv[2])
config = LlamaConfig.from_pretrained(source)
config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    if (source / name).exists():
        shutil.copy(source / name, out / name)
