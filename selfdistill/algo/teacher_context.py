"""What the self-teacher reads (SPEC section 6): each row's teacher context and the teacher prompt.

Teacher context:
- SDPO: the *demonstration* of rollout i is the completion of the first other rollout j of its
  group, in rollout order, that is correct (`choose_demonstrations`; rollout i itself only with
  `algo.distill.reprompt_on_self_success=true`). With `algo.distill.feedback=true` a rollout with
  no demonstration gets the grader's message instead (`grader_feedback`), never the gold answer. A
  rollout with neither has no teacher (teacher mask 0).
- SDFT: the row's demonstration (`Example.teacher_demonstration`).

Teacher prompt (`teacher_prompt_ids`): the chat-templated prompt whose last user message is replaced
by the template with `{prompt}` = that message's text and `{demonstration}` (or `{feedback}`) = the
context. The context is spliced in at token level (SPEC section 1): a sibling's completion enters as
its exact sampled token ids (EOS and padding cut, meta blocks as written, never re-tokenized), a text
(an SDFT demonstration, a grader message) is tokenized on its own; the chat-templated text before and
after the slot is tokenized as two pieces. The prompt keeps its last `max_tokens` tokens. The
student's completion ids are appended to it unchanged by the scoring pass (selfdistill.algo.teacher).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import torch

from selfdistill.config import DataConfig
from selfdistill.data import chat_prompt_text
from selfdistill.data.example import Example
from selfdistill.rewards.grader import extract_boxed_answer
from selfdistill.rewards.regions import content_ids, rollout_outside_meta_texts
from selfdistill.rollout.base import RolloutBatch

NO_BOXED = "no \\boxed{} answer found"
CUT_OFF = "the answer was cut off at the length limit"
_SLOT = re.compile(r"\{(prompt|demonstration|feedback)\}")
_SENTINEL = "\ue000teacher-context\ue000"  # a private-use character: no chat template writes it


def choose_demonstrations(correct: Sequence[bool], group_ids: Sequence[int], allow_self: bool = False) -> list[Optional[int]]:
    """For each rollout, the index of its demonstration: the first correct rollout of its group in
    rollout order, itself excluded unless `allow_self`; None when there is none."""
    correct, groups = [bool(c) for c in correct], [int(g) for g in group_ids]
    out = []
    for i, g in enumerate(groups):
        out.append(next((j for j, (h, c) in enumerate(zip(groups, correct)) if h == g and c and (allow_self or j != i)), None))
    return out


def grader_feedback(pieces: Sequence[str], truncated: bool) -> Optional[str]:
    """The grader's message for a rollout that earned none of the credit a demonstration gives:
    the completion hit the length limit, or has no `\\boxed{}` answer outside meta blocks. None for
    a complete, boxed (wrong) answer: the grader knows nothing more about it than that it is wrong,
    and saying what is right would give the gold answer away."""
    if truncated:
        return CUT_OFF
    if extract_boxed_answer(pieces) is None:
        return NO_BOXED
    return None


def teacher_prompt_ids(tokenizer, example: Example, template: str, context_ids: list[int], *,
                       data: Optional[DataConfig] = None, max_tokens: Optional[int] = None) -> list[int]:
    """Token ids of `example`'s teacher prompt with the context `context_ids` in the template's
    `{demonstration}` or `{feedback}` slot; the last `max_tokens` of them. `data`: the run's data config
    (system prompt, chat template and its kwargs, as for the student's prompt)."""
    messages = [dict(m) for m in example.prompt]
    last_user = next((k for k in range(len(messages) - 1, -1, -1) if messages[k]["role"] == "user"), None)
    if last_user is None:
        raise ValueError(f"row {example.id!r}: the prompt has no user message to build the teacher prompt from")
    question = messages[last_user]["content"]
    messages[last_user]["content"] = _SLOT.sub(lambda m: question if m.group(1) == "prompt" else _SENTINEL, template)
    text = chat_prompt_text(tokenizer, messages, data or DataConfig())
    head, found, tail = text.partition(_SENTINEL)
    if not found or _SENTINEL in tail:
        raise ValueError(f"teacher template {template!r} must hold exactly one {{demonstration}} or {{feedback}} slot "
                         f"(and the chat template must keep the user message's text)")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    ids = encode(head) + list(context_ids) + encode(tail)
    return ids[-max_tokens:] if max_tokens else ids


def text_ids(tokenizer, text: str) -> list[int]:
    """A context text's token ids, tokenized on its own (SPEC section 1)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclasses.dataclass
class SDPOContexts:
    """Teacher prompts of a rollout batch (None = no teacher) and what each context is."""

    prompts: list[Optional[list[int]]]
    demonstration: torch.Tensor  # [R] bool: the context is a sibling's completion
    feedback: torch.Tensor  # [R] bool: the context is the grader's message

    @property
    def has_teacher(self) -> torch.Tensor:
        return self.demonstration | self.feedback


def sdpo_contexts(batch: RolloutBatch, grades: torch.Tensor, examples: list[Example], tokenizer, meta_ids: tuple[int, int],
                  distill, data: Optional[DataConfig]) -> SDPOContexts:
    """SDPO's teacher prompt for every rollout of the batch (rollout i belongs to group
    `batch.group_ids[i]`, whose prompt is `examples[group]`)."""
    groups = batch.group_ids.tolist()
    demos = choose_demonstrations((grades == 1).tolist(), groups, distill.reprompt_on_self_success)
    completions = content_ids(batch, tokenizer.eos_token_id)
    need_feedback = distill.feedback and any(d is None for d in demos)
    pieces = rollout_outside_meta_texts(batch, tokenizer, meta_ids) if need_feedback else None
    truncated = batch.truncated.tolist() if batch.truncated is not None else [False] * len(batch)
    prompts, is_demo, is_feedback = [], [], []
    for i, j in enumerate(demos):
        ex = examples[groups[i]]
        message = grader_feedback(pieces[i], truncated[i]) if j is None and need_feedback else None
        if j is not None:
            template, context = distill.template, completions[j]
        elif message is not None:
            template, context = distill.feedback_template, text_ids(tokenizer, message)
        else:
            template = None
        prompts.append(None if template is None else teacher_prompt_ids(
            tokenizer, ex, template, context, data=data, max_tokens=distill.max_teacher_prompt_tokens))
        is_demo.append(j is not None)
        is_feedback.append(j is None and message is not None)
    return SDPOContexts(prompts, torch.tensor(is_demo, dtype=torch.bool), torch.tensor(is_feedback, dtype=torch.bool))
