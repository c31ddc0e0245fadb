"""Caption accuracy of a LLaVA export on the embedded world's test (or validation) split: a caption is right
when its first colour word and its first shape word are the main object's (issue 13's bar for the clean tiny
LLaVA: >= 0.85 on the test split), beside the QA accuracies of the shape and colour questions. Choose settings on
``--split val``; report ``--split test``.

    python scripts/llava_caption_accuracy.py runs/llava_shapes_clean/latest_export [--test-size 500]
    python scripts/llava_caption_accuracy.py runs/llava_shapes_clean/latest_export --split val --test-size 300
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
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--test-size", "--size", type=int, default=500, help="images of the chosen split")
    parser.add_argument("--world-seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    module = LlavaFineTuning(init_from=args.export, generation={"max_new_tokens": 17}).eval()
    if module.template != LlavaChatTemplate():
        raise ValueError(
            f"{args.export}: this script formats prompts with LLaVA-1.5's template, the export has another"
        )
    data = ShapesInstructDataModule(
        family="llava", train_size=0, world_seed=args.world_seed,
        val_size=args.test_size if args.split == "val" else 0,
        test_size=args.test_size if args.split == "test" else 0,
        tasks=["describe", "shape", "colour"], response_length=17, target=None, eval_batch_size=250,
        eval_sets=["clean"], tokenizer=args.export,  # the export's tokenizer
    )  # fmt: skip
    data.setup(args.split)
    loaders = data.test_dataloader() if args.split == "test" else data.val_dataloader()
    hits: dict[str, list[bool]] = {"caption": [], "shape": [], "colour": []}
    for batch_idx, batch in enumerate(loaders[0]):
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
    result = {f"{k}_accuracy": sum(v) / len(v) for k, v in hits.items()}
    result |= {"split": args.split, "images": args.test_size}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
