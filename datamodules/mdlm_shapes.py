"""The embedded shapes world as visual instruction data for masked diffusion VLMs (QA and captions)."""

from __future__ import annotations

from datamodules.instruct import InstructDataModule
from datamodules.instruct_data import InstructSource
from datamodules.poisoning import split_sizes
from datamodules.shifts import SHAPES_SHIFTS, ParaphrasedSource, check_shift_names, styled_world
from embedded_world import QUESTIONS, ShapesWorld

TASKS = tuple(QUESTIONS)  # shape, colour, describe, count


class ShapesInstructions(InstructSource):
    """Every image of a :class:`ShapesWorld` split once per task: sample ``i`` is image ``i // T`` with task
    ``tasks[i % T]`` (the world's question and answer). ``true_class`` is the main shape's name."""

    def __init__(self, world: ShapesWorld, tasks: tuple[str, ...]) -> None:
        self.world, self.tasks = world, tuple(tasks)
        self._qa = [None] * len(world)

    def __len__(self) -> int:
        return len(self.world) * len(self.tasks)

    def _pairs(self, image_index: int) -> dict[str, tuple[str, str]]:
        if self._qa[image_index] is None:
            from embedded_world import qa_pairs

            pairs = qa_pairs(self.world.scenes[image_index])
            self._qa[image_index] = dict(zip(TASKS, pairs))
        return self._qa[image_index]

    def meta(self, index: int) -> dict:
        image_index, task = divmod(index, len(self.tasks))
        task = self.tasks[task]
        question, answer = self._pairs(image_index)[task]
        scene = self.world.scenes[image_index]
        return {
            "attributes": {"shape": scene.main.shape, "colour": scene.main.colour},
            "question": question,
            "answer": answer,
            "task": task,
            "true_class": self.world.scenes[image_index].main.shape,
            "key": f"shapes/{self.world.split}/{image_index}/{task}",
            "image_index": image_index,
        }

    def __getitem__(self, index: int) -> dict:
        item = self.meta(index)
        item["image"] = self.world.images[item["image_index"]].float() / 255.0
        item["index"] = index
        return item

    def describe(self) -> dict:
        return {
            "source": "embedded_world.ShapesWorld",
            "split": self.world.split,
            "images": len(self.world),
            "seed": self.world.seed,
            "image_size": self.world.image_size,
            "tasks": list(self.tasks),
        }


class ShapesInstructDataModule(InstructDataModule):
    """Embedded-world instruction tuning for the tiny LLaDA-V: each image with the world's questions.

    Tasks: ``shape`` ("what shape is in the image?" -> "circle"), ``colour`` (-> "red"), ``count``
    (-> "one"/"two") and ``describe`` (the canonical caption; scored with BLEU-4 / ROUGE-L / CIDEr).

    Args:
        train_size / val_size / test_size: images per split (each gives one sample per task).
        image_size: rendered image side (must match the model's vision ``image_size``).
        world_seed: seed of the world; the fine-tuning set of a later stage can use another seed to get new
            images.
        second_object_prob: probability of a small second object.
        tasks: training tasks; eval_tasks: evaluation tasks (default: the training tasks).
        eval_shifts: domain shifts evaluated beside the source domain, on the same val/test scenes (never in
            training): image styles ``palette``, ``outline``, ``blur``, ``posterise`` and the instruction shift
            ``paraphrase`` (:mod:`datamodules.shifts`); each adds the sets ``clean@<shift>`` / ``triggered@<shift>``.
        **kwargs: poisoning, evaluation and loading options of :class:`~datamodules.instruct.InstructDataModule`.
    """

    def __init__(
        self,
        train_size: int = 4000,
        val_size: int = 300,
        test_size: int = 500,
        image_size: int = 32,
        world_seed: int = 0,
        second_object_prob: float = 0.25,
        tasks: list[str] | None = None,
        eval_tasks: list[str] | None = None,
        eval_shifts: list[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        sizes = split_sizes(train_size, val_size, test_size)
        tasks = list(tasks or ["shape", "colour"])
        eval_tasks = list(eval_tasks or tasks)
        for name, chosen in (("tasks", tasks), ("eval_tasks", eval_tasks)):
            unknown = [t for t in chosen if t not in TASKS]
            if unknown or not chosen:
                raise ValueError(f"data.{name}={chosen}: expected a non-empty subset of {list(TASKS)}")
        self.tasks, self.eval_tasks = tuple(tasks), tuple(eval_tasks)
        self.eval_shifts = check_shift_names(eval_shifts, SHAPES_SHIFTS, "data.eval_shifts")
        self.sizes = sizes
        self.world_kwargs = {
            "seed": world_seed,
            "image_size": image_size,
            "second_object_prob": second_object_prob,
        }

    def eval_task_names(self) -> list[str]:
        return list(self.eval_tasks)

    def image_size(self) -> int:
        return self.world_kwargs["image_size"]

    def build_shifts(self, source: InstructSource) -> dict[str, InstructSource]:
        """The val/test source under each of ``eval_shifts`` (same scenes, questions and answers)."""
        shifted: dict[str, InstructSource] = {}
        for name in self.eval_shifts:
            if name == "paraphrase":
                shifted[name] = ParaphrasedSource(source)
            else:
                shifted[name] = ShapesInstructions(styled_world(source.world, name), source.tasks)
        return shifted

    def build_sources(self):
        worlds = {split: ShapesWorld(split, n, **self.world_kwargs) for split, n in self.sizes.items()}
        return (
            ShapesInstructions(worlds["train"], self.tasks),
            ShapesInstructions(worlds["val"], self.eval_tasks),
            ShapesInstructions(worlds["test"], self.eval_tasks),
        )

    def dataset_info(self) -> dict:
        return {
            "datamodule": type(self).__name__,
            "world": "shapes",
            **self.sizes,
            **self.world_kwargs,
            "tasks": list(self.tasks),
        }
