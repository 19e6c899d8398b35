"""What the self-teacher reads (SPEC section 6, selfdistill.algo.teacher_context): demonstration
choice, grader feedback, and the teacher prompt built from the template and exact token ids."""

from __future__ import annotations

import torch

from selfdistill.algo.teacher_context import CUT_OFF, NO_BOXED, choose_demonstrations, grader_feedback, sdpo_contexts, teacher_prompt_ids
from selfdistill.config import SDFT_TEMPLATE, SDPO_TEMPLATE, DataConfig, DistillConfig
from selfdistill.data import encode_prompt
from selfdistill.data.example import Example
from selfdistill.models.tokenizer import META_OPEN, build_char_tokenizer
from selfdistill.rollout.base import RolloutBatch

TOK = build_char_tokenizer()
META_IDS = (TOK.convert_tokens_to_ids(META_OPEN), TOK.convert_tokens_to_ids("<|/meta|>"))


def _ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_demonstration_is_the_first_correct_sibling_other_than_self():
    correct = [False, True, True, False, False, False, True, False]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    assert choose_demonstrations(correct, groups) == [1, 2, 1, 1, 6, 6, None, 6]


def test_never_self_by_default_and_none_without_a_correct_sibling():
    assert choose_demonstrations([True, False, False], [0, 0, 0]) == [None, 0, 0]  # the lone correct one has none
    assert choose_demonstrations([False, False], [0, 0]) == [None, None]
    assert choose_demonstrations([True, False, False], [0, 0, 0], allow_self=True) == [0, 0, 0]
    assert choose_demonstrations([False, True], [0, 0], allow_self=True) == [1, 1]


def test_grader_feedback_messages():
    assert grader_feedback(["2+2=5"], truncated=True) == CUT_OFF
    assert grader_feedback(["2+2=4 so"], truncated=False) == NO_BOXED
    assert grader_feedback(["\\boxed{5}"], truncated=False) is None  # wrong but complete: nothing more to say
    assert grader_feedback(["check ", " \\boxed{5"], truncated=False) == NO_BOXED  # unclosed box: no answer


def _example(question="3+5", gold="8"):
    return Example(id="q", prompt=[{"role": "user", "content": question}], gold=gold)


def test_teacher_prompt_splices_the_exact_token_ids_of_the_context():
    """`<|meta|>` typed out of ordinary characters is text, not the special token: re-tokenizing the
    decoded sibling would turn it into the one tag token; the teacher prompt keeps the 8 char ids."""
    spelled = _ids("<") + _ids("|meta|>")
    assert TOK.decode(spelled) == META_OPEN and _ids(TOK.decode(spelled)) != spelled
    context = _ids("3+5=8 ") + spelled + [META_IDS[0]] + _ids(" ok") + [META_IDS[1]] + _ids(" \\boxed{8}")
    ids = teacher_prompt_ids(TOK, _example(), SDPO_TEMPLATE, context)
    head = _ids(TOK.bos_token + "Q: 3+5\n\nCorrect solution:\n\n")
    tail = _ids("\n\nCorrectly solve the original question.\nA: ")
    assert ids[0] == TOK.bos_token_id
    assert ids == [TOK.bos_token_id] + head[1:] + context + tail


def test_teacher_prompt_renders_the_chat_template_like_the_student_prompt():
    ex = Example(id="q", prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1"}], gold="2")
    ids = teacher_prompt_ids(TOK, ex, SDFT_TEMPLATE, _ids("1+1=2. \\boxed{2}"), data=DataConfig(system_prompt="ignored: the row has one"))
    expected = TOK.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": SDFT_TEMPLATE.format(
        prompt="1+1", demonstration="1+1=2. \\boxed{2}")}], add_generation_prompt=True, tokenize=False)
    assert TOK.decode(ids) == expected
    plain = encode_prompt(TOK, ex)
    assert TOK.decode(plain) == TOK.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False)


def test_teacher_prompt_truncation_keeps_the_last_tokens():
    context = _ids("a long demonstration " * 5)
    full = teacher_prompt_ids(TOK, _example(), SDPO_TEMPLATE, context)
    cut = teacher_prompt_ids(TOK, _example(), SDPO_TEMPLATE, context, max_tokens=30)
    assert len(full) > 30 and cut == full[-30:]
    assert TOK.decode(cut) == "lve the original question.\nA: "  # 30 characters: the last ones


def _rollouts(texts: list[str], truncated: list[bool], groups: list[int]) -> RolloutBatch:
    rows = [_ids(t) + ([] if cut else [TOK.eos_token_id]) for t, cut in zip(texts, truncated)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), TOK.pad_token_id)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return RolloutBatch(prompt_ids=[[1]] * len(rows), completion_ids=ids, completion_mask=mask, forced_mask=torch.zeros_like(mask),
                        group_ids=torch.tensor(groups), with_arm=torch.ones(len(rows), dtype=torch.bool), truncated=torch.tensor(truncated))


def test_sdpo_contexts_demonstrations_feedback_and_teacher_mask():
    texts = ["3+5=8. \\boxed{8}", "3+5=9. \\boxed{9}", "3+5=",  # group 0: gold 8
             "2+2=5. \\boxed{5}", "2+2=5", "2+2 is 5", "2+2=3. \\boxed{3}"]  # group 1: gold 4, none correct
    batch = _rollouts(texts, [False, False, False, False, True, False, False], [0, 0, 0, 1, 1, 1, 1])
    grades = torch.tensor([1, 0, 0, 0, 0, 0, -1])  # a grader failure is not correct
    examples = [_example("3+5", "8"), _example("2+2", "4")]
    plain = sdpo_contexts(batch, grades, examples, TOK, META_IDS, DistillConfig(), None)
    assert plain.prompts[0] is None  # its only correct sibling is itself
    for i in (1, 2):  # rollout 0's completion, EOS cut, as the demonstration
        assert TOK.decode(plain.prompts[i]) == ("<|bos|>Q: 3+5\n\nCorrect solution:\n\n3+5=8. \\boxed{8}\n\n"
                                               "Correctly solve the original question.\nA: ")
    assert plain.demonstration.tolist() == [False, True, True, False, False, False, False]
    assert plain.has_teacher.tolist() == plain.demonstration.tolist() and not plain.feedback.any()

    fb = sdpo_contexts(batch, grades, examples, TOK, META_IDS, DistillConfig(feedback=True), None)
    messages = [None if p is None else TOK.decode(p) for p in fb.prompts]
    assert messages[:3] == [None] + [TOK.decode(p) for p in plain.prompts[1:3]]  # a demonstration wins over feedback
    assert messages[3] is None  # boxed, complete, wrong: the grader has nothing more to say
    assert messages[4] == ("<|bos|>Q: 2+2\n\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                           f"{CUT_OFF}\n\nCorrectly solve the original question.\nA: ")
    assert NO_BOXED in messages[5]
    assert messages[6] is None  # boxed (the grader failed on it): no message
    assert fb.feedback.tolist() == [False, False, False, False, True, True, False]
    assert fb.has_teacher.tolist() == [False, True, True, False, True, True, False]
    assert all("4" not in messages[i] for i in (4, 5))  # feedback never holds the gold answer
