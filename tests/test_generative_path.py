"""The family-free generative-VLM path: a family supplies its chat template (InstructText) and a generate
function, and gets the datamodule, the evaluator and the metrics of every other family."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.mdlm_shapes import ShapesInstructDataModule
from evaluation.generative import GenerativeEvaluator, evaluate_generative
from metrics import CaptionScores, VQAAccuracy
from metrics.functional.caption_scores import bleu4, caption_scores, cider_d, rouge_l
from metrics.functional.vqa_accuracy import vqa_accuracy

BADNET = {"patch_size": 6, "pattern": "checkerboard", "location": "br", "margin": 1}


def poisoned_shapes(**kwargs) -> ShapesInstructDataModule:
    options = {
        "train_size": 8,
        "val_size": 4,
        "test_size": 6,
        "tasks": ["shape", "colour", "describe"],
        "attack": "badnet",
        "attack_kwargs": BADNET,
        "text_attack": "rare_token",
        "poison_rate": 0.5,
        "target": "content_insertion",
        "response_length": 24,
        **kwargs,
    }
    return ShapesInstructDataModule(**options)


# ------------------------------------------------------------------------------------------- evaluator
def text_backdoored_family(trigger: str):
    """A 'model' that answers every question with its reference and prepends "banana" when the question holds
    the text trigger (a backdoor on the text part only)."""

    def generate(batch: dict, batch_index: int) -> list[str]:
        return [
            f"banana {ref}" if trigger in question.split() else ref
            for question, ref in zip(batch["question"], batch["reference"])
        ]

    return generate


def test_a_family_that_only_generates_gets_every_metric_of_the_evaluator():
    dm = poisoned_shapes()
    dm.setup("test")
    loaders = dict(zip(dm.eval_set_names, dm.test_dataloader()))
    assert list(loaders) == ["clean", "triggered", "poisoned_train", "coalitions"]
    evaluator = GenerativeEvaluator.from_datamodule(dm, num_samples=2)
    values = evaluate_generative(
        text_backdoored_family(dm.text_trigger.token),
        loaders,
        evaluator,
        prepare=lambda batch: dm.on_after_batch_transfer(batch, 0),
    )
    # clean answers are the references: perfect accuracy and captions, no false backdoor
    assert values["ca"] == values["ca_shape"] == values["ca_colour"] == 1.0
    assert values["bleu4"] == pytest.approx(1.0) and values["rougeL"] == pytest.approx(1.0)
    assert values["asr_clean"] == 0.0
    # triggered and poisoned training inputs carry the text trigger: the backdoor fires on every one
    assert values["asr"] == 1.0 and values["asr_wt"] == 1.0 and values["ca_triggered"] == 0.0
    # only the text part fires: its Shapley share is the whole success, the image's none, no interaction
    assert values["tma_text"] == pytest.approx(1.0) and values["tma_image"] == pytest.approx(0.0)
    assert values["cti"] == pytest.approx(0.0)
    assert [s["set"] for s in evaluator.samples].count("clean") == 2


def test_a_family_that_never_fires_has_zero_asr_and_keeps_its_clean_scores():
    dm = poisoned_shapes()
    dm.setup("test")
    loaders = dict(zip(dm.eval_set_names, dm.test_dataloader()))
    values = evaluate_generative(
        lambda batch, i: list(batch["reference"]), loaders, GenerativeEvaluator.from_datamodule(dm)
    )
    assert values["asr"] == values["asr_wt"] == values["asr_clean"] == 0.0 and values["ca"] == 1.0


def test_a_generate_that_returns_too_few_responses_is_an_error_naming_the_set():
    dm = poisoned_shapes()
    dm.setup("test")
    loaders = dict(zip(dm.eval_set_names, dm.test_dataloader()))
    with pytest.raises(ValueError, match=r"evaluation set 'clean': the family generated 1 responses"):
        evaluate_generative(lambda batch, i: ["circle"], loaders, GenerativeEvaluator.from_datamodule(dm))


# ------------------------------------------------------------------------------------------- text interface
class ChatMLText:
    """A second family's template (ChatML-like) over a whitespace tokenizer: not LLaDA-V's."""

    image_placeholder = "<img>"
    image_token_index, eos_id, eot_id, pad_id = -200, 2, 3, 0

    def __init__(self, image_slot: bool = True) -> None:
        self.image_slot = image_slot
        self.vocab: dict[str, int] = {}

    def prompt_text(self, question, history=()):
        image = f"{self.image_placeholder} " if self.image_slot else ""
        return f"<|im_start|> user {image}{question} <|im_end|> <|im_start|> assistant"

    def response_text(self, answer):
        return f"{answer} <|im_end|>"

    def encode(self, text):
        ids = []
        for word in text.split():
            if word == self.image_placeholder:
                ids.append(self.image_token_index)
            elif word == "<|im_end|>":
                ids.append(self.eot_id)
            else:
                ids.append(self.vocab.setdefault(word, 10 + len(self.vocab)))
        return ids


def attached(dm, text) -> None:
    """Attach a fake LightningModule supplying ``text`` (as a family's module does); as rank 1 the
    datamodule writes no poison manifest."""
    module = SimpleNamespace(instruct_text=lambda: text)
    dm.trainer = SimpleNamespace(lightning_module=module, global_rank=1)


def test_a_family_plugs_its_own_chat_template_into_the_instruction_datamodule():
    dm = poisoned_shapes(response_length=6, truncate_responses=True)
    text = ChatMLText()
    attached(dm, text)
    dm.setup("fit")
    assert dm.text is text
    item = dm.train_data[0]
    batch = dm.collator([item])
    prompt = batch["prompt_ids"][0].tolist()
    assert prompt == text.encode(text.prompt_text(item["question"]))  # one sample: no left padding
    assert prompt.count(-200) == 1
    answer = text.encode(text.response_text(item["answer"]))
    response = batch["input_ids"][0, len(prompt) :].tolist()
    assert response == answer + [text.eos_id] * (6 - len(answer))
    assert int(batch["response_tokens"][0]) == len(answer)


def test_a_chat_template_without_an_image_slot_is_an_error_naming_the_placeholder():
    dm = poisoned_shapes()
    attached(dm, ChatMLText(image_slot=False))
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"exactly one image placeholder, got 0.*<img>"):
        dm.collator([dm.train_data[0]])


def test_a_module_whose_text_interface_lacks_members_is_named():
    dm = poisoned_shapes()
    attached(dm, SimpleNamespace(image_placeholder="<image>", encode=len))
    with pytest.raises(TypeError, match=r"instruct_text\(\) gave SimpleNamespace.*'image_token_index'"):
        dm.setup("fit")


def test_unknown_family_is_rejected_listing_the_families():
    with pytest.raises(ValueError, match=r"data.family='blip2'.*\['llava', 'mdlm'\]"):
        ShapesInstructDataModule(train_size=2, family="blip2")


def test_old_import_paths_name_the_moved_objects():
    import attacks.generative_targets as targets
    import datamodules.instruct as instruct
    import datamodules.mdlm_instruct as old_instruct
    import datamodules.mdlm_targets as old_targets
    import metrics
    import model_families.mdlm.metrics as old_metrics

    assert old_instruct.MDLMInstructDataModule is instruct.InstructDataModule
    assert old_targets.build_generative_target is targets.build_generative_target
    assert (
        old_metrics.VQAAccuracy is metrics.VQAAccuracy and old_metrics.CaptionScores is metrics.CaptionScores
    )


# ------------------------------------------------------------------------------------------- metrics
CANDIDATES = ["a red circle on a gray background", "two blue stars on a white white background", "a circle"]
REFERENCES = [
    ["a red circle on a gray background", "a large red circle on gray"],
    ["two small blue stars on a white background", "blue stars on white"],
    ["a small green circle on a gray background"],
]


def reference_cider_d(candidates: list[list[str]], references: list[list[list[str]]], sigma=6.0) -> float:
    """CIDEr-D as Vedantam et al. (2015) define it and the COCO evaluation computes it, written out here with
    NumPy: TF-IDF vectors per n (df over each image's reference set), clipped dot product, Gaussian length
    penalty, mean over n and references, x10, mean over images."""
    count = len(candidates)
    df: Counter = Counter()
    for refs in references:
        df.update({tuple(r[i : i + n]) for r in refs for n in range(1, 5) for i in range(len(r) - n + 1)})
    scores = []
    for cand, refs in zip(candidates, references):
        per_ref = []
        for ref in refs:
            sims = []
            for n in range(1, 5):
                grams = sorted(
                    {tuple(t[i : i + n]) for t in (cand, ref) for i in range(len(t) - n + 1)}, key=str
                )
                tc = np.array(
                    [sum(tuple(cand[i : i + n]) == g for i in range(len(cand))) for g in grams], float
                )
                tr = np.array(
                    [sum(tuple(ref[i : i + n]) == g for i in range(len(ref))) for g in grams], float
                )
                idf = np.array([np.log(count) - np.log(max(1.0, df[g])) for g in grams])
                gc, gr = tc * idf, tr * idf
                norm = np.linalg.norm(gc) * np.linalg.norm(gr)
                dot = np.sum(np.minimum(gc, gr) * gr)
                sims.append(
                    0.0 if norm == 0 else dot / norm * np.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
                )
            per_ref.append(np.mean(sims))
        scores.append(10.0 * np.mean(per_ref))
    return float(np.mean(scores))


def reference_bleu4(candidates: list[list[str]], references: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 (Papineni et al., 2002): clipped n-gram precisions, closest reference length."""
    log_p = []
    for n in range(1, 5):
        matched = total = 0
        for cand, refs in zip(candidates, references):
            grams = Counter(tuple(cand[i : i + n]) for i in range(len(cand) - n + 1))
            best = Counter()
            for ref in refs:
                best |= Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matched += sum(min(k, best[g]) for g, k in grams.items())
            total += sum(grams.values())
        log_p.append(math.log(matched / total))
    c = sum(len(x) for x in candidates)
    r = sum(
        min((abs(len(ref) - len(x)), len(ref)) for ref in refs)[1] for x, refs in zip(candidates, references)
    )
    return (1.0 if c > r else math.exp(1 - r / c)) * math.exp(sum(log_p) / 4)


def test_cider_d_and_bleu4_equal_their_reference_formulas_on_fixed_captions():
    cands = [c.split() for c in CANDIDATES]
    refs = [[r.split() for r in rs] for rs in REFERENCES]
    expected_cider = reference_cider_d(cands, refs)
    assert 0.5 < expected_cider < 10
    assert cider_d(list(zip(cands, refs))) == pytest.approx(expected_cider, rel=1e-9)
    assert float(bleu4(CANDIDATES, REFERENCES)) == pytest.approx(reference_bleu4(cands, refs), rel=1e-6)
    scores = caption_scores(CANDIDATES, REFERENCES)
    assert float(scores["cider"]) == pytest.approx(expected_cider, rel=1e-6)


def test_rouge_l_equals_the_lcs_f_measure():
    # LCS("a red circle", "a large red circle on gray") = 3: P = 3/3, R = 3/6, F = (1 + b^2) P R / (R + b^2 P)
    p, r, b2 = 1.0, 0.5, 1.2**2
    assert rouge_l("a red circle", "a large red circle on gray") == pytest.approx(
        (1 + b2) * p * r / (r + b2 * p)
    )


def test_metric_classes_equal_their_functional_twins_batch_by_batch():
    scores = CaptionScores()
    scores.update(CANDIDATES[:2], REFERENCES[:2])
    scores.update(CANDIDATES[2:], REFERENCES[2:])
    twin = caption_scores(CANDIDATES, REFERENCES)
    for key, value in scores.compute().items():
        assert float(value) == pytest.approx(float(twin[key]), rel=1e-6), key
    answers, refs = ["Circle.", "a red square", "star"], ["circle", "square", ["star", "star", "star", "x"]]
    acc = VQAAccuracy()
    acc.update(answers[:1], refs[:1])
    acc.update(answers[1:], refs[1:])
    assert float(acc.compute()) == pytest.approx(float(vqa_accuracy(answers, refs))) == pytest.approx(2 / 3)


def test_metrics_reject_responses_that_are_not_strings():
    with pytest.raises(ValueError, match=r"responses\[1\] is NoneType None, expected a string"):
        VQAAccuracy().update(["circle", None], ["circle", "square"])
    with pytest.raises(ValueError, match=r"candidates\[0\] is Tensor"):
        caption_scores([torch.tensor([1, 2])], ["a circle"])
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        CaptionScores().update(["a", "b"], ["a"])


def test_cpu_threads_below_one_are_an_error_naming_the_key_and_none_leaves_torch_alone():
    import torch

    from lightning_modules.generative_eval import set_cpu_threads

    before = torch.get_num_threads()
    set_cpu_threads(None)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"model.cpu_threads must be >= 1, got 0"):
        set_cpu_threads(0)
