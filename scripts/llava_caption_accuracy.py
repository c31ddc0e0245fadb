"""Caption accuracy of a LLaVA export on the embedded world's test split: a caption is right when its first
colour word and its first shape word are the main object's (issue 13's bar for the clean tiny LLaVA: >= 0.85),
beside the QA accuracies of the shape and colour questions.

    python scripts/llava_caption_accuracy.py runs/llava_shapes_clean/latest_export [--test-size 500]
"""

from __future__ import annotations

import argparse
import json

import torch

from datamodules.mdlm_shapes import ShapesInstructDataModule
from embedded_world import COLOURS, SHAPES
from lightning_modules.llava_finetune import LlavaFineTuning
from model_families.llava import LlavaChatTemplate


def caption_hit(caption: str, shape: str, colour: str) -> bool:
    """Whether the first colour word and the first shape word of ``caption`` are ``colour`` and ``shape``."""
    words = caption.lower().replace(".", " ").split()
    first_colour = next((w for w in words if w in COLOURS), None)
    first_shape = next((w for w in words if w in SHAPES), None)
    return first_colour == colour and first_shape == shape


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--world-seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    module = LlavaFineTuning(init_from=args.export, generation={"max_new_tokens": 17}).eval()
    if module.template != LlavaChatTemplate():
        raise ValueError(
            f"{args.export}: this script formats prompts with LLaVA-1.5's template, the export has another"
        )
    data = ShapesInstructDataModule(
        family="llava", train_size=0, val_size=0, test_size=args.test_size, world_seed=args.world_seed,
        tasks=["describe", "shape", "colour"], response_length=17, target=None, eval_batch_size=250,
        eval_sets=["clean"], tokenizer=args.export,  # the export's tokenizer
    )  # fmt: skip
    data.setup("test")
    hits: dict[str, list[bool]] = {"caption": [], "shape": [], "colour": []}
    for batch_idx, batch in enumerate(data.test_dataloader()[0]):
        for response, task, attrs, ref in zip(
            module.generate_responses(batch, batch_idx),
            batch["task"],
            batch["attributes"],
            batch["reference"],
        ):
            if task == "describe":
                hits["caption"].append(caption_hit(response, attrs["shape"], attrs["colour"]))
            else:
                hits[task].append(response.strip().rstrip(".").lower() == ref.lower())
    result = {f"{k}_accuracy": sum(v) / len(v) for k, v in hits.items()} | {"test_images": args.test_size}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
