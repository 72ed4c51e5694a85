"""Load exported models with plain diffusers and write their outputs: the same code under two stacks.

``tests/test_transformers4.py`` runs ``outputs(case)`` in this process (transformers 5) and
``python tests/tf4_check.py cases.json`` with the transformers-4 virtualenv's Python, then
compares the arrays. Only diffusers, transformers, torch and numpy are imported here (not
the studio): this is what a person does with an exported model in their own environment.
"""

from __future__ import annotations

import json
import sys
import warnings


def outputs(case: dict) -> dict:
    """Token ids, text embeddings and a 2-step image (SD), or a 3-step sample (DDPM), as numpy arrays."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    result = {}
    if case["kind"] == "ddpm":
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(case["model"])
        result["image"] = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                               output_type="np").images
        return {k: np.asarray(v) for k, v in result.items()}
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(case["model"], safety_checker=None, requires_safety_checker=False)
    if case.get("lora"):
        pipe.load_lora_weights(case["lora"], weight_name="pytorch_lora_weights.safetensors")
    ids = pipe.tokenizer([case["prompt"]], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        result["ids"] = ids.numpy()
        result["embeds"] = pipe.text_encoder(ids)[0].float().numpy()
    size = int(case.get("size", 16))
    result["image"] = pipe(case["prompt"], num_inference_steps=2, guidance_scale=3.0, height=size, width=size,
                           generator=torch.Generator().manual_seed(0), output_type="np").images
    return {k: np.asarray(v) for k, v in result.items()}


def main(spec_path: str) -> None:
    import numpy as np

    warnings.filterwarnings("ignore")
    import diffusers
    import transformers

    with open(spec_path, encoding="utf-8") as fh:
        cases = json.load(fh)
    for case in cases:
        np.savez(case["out"], **outputs(case))
    print(json.dumps({"transformers": transformers.__version__, "diffusers": diffusers.__version__}))


if __name__ == "__main__":
    main(sys.argv[1])
