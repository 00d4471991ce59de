"""Prompt sets from files: JSONL (one JSON object per line) or Parquet, tokenized and length-filtered.

    prompt_set = load_prompt_set("train.jsonl", tokenizer, template="{prompt}\\nPut the answer in \\boxed{}.",
                                 max_prompt_tokens=1024)
    sampler = PromptSampler(len(prompt_set), seed=seed, rank=dp_rank, num_ranks=dp_size)
    indices = sampler.draw(num_prompts)      # without replacement within an epoch, this rank's share

A record's prompt is a string or a chat list of {"role", "content"} messages; its answer a string or
a number (kept as its string form, which the math reward compares). A key may be a dotted path into
nested objects, as in verl's Parquet files (`--answer-key reward_model.ground_truth`); a key that
exists as written (dots included) wins. Errors name the file, the line (Parquet: the row), the key and
its flag, and are raised while reading, before any prompt is tokenized.

Chat lists are rendered by `chat_template` (`--chat-template`): "auto" uses the tokenizer's own
template (without one, the contents joined by blank lines), "none" always joins the contents, and a
path to a Jinja file renders with that template instead — then a text prompt becomes one user
message too, so a base model's plain-text set can be trained in a chat format.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"
CHAT_TEMPLATE_MODES = ("auto", "none")  # or a path to a Jinja template file
_KEY_FLAGS = {"prompt": "--prompt-key", "answer": "--answer-key"}


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts with their reference answers, one entry each; `num_dropped` prompts of the
    file were longer than max_prompt_tokens and are not in it."""

    prompts: list[list[int]]
    answers: list[str]
    source: str
    num_dropped: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    prompt: str | list[dict]  # text, or chat messages
    answer: str
    location: str             # "file:line" (JSONL) or "file row N" (Parquet), for error messages


def _jsonl_rows(path: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as handle:  # decoded line by line, so that a bad byte is reported by line
        for line_number, raw in enumerate(handle, start=1):
            location = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{location}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                                 f"save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{location}: invalid JSON ({error.msg} at column {error.colno}); each "
                                 f"line must hold one JSON object") from None
            yield location, row


def _parquet_rows(path: str) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow, which is not installed; "
                          f"`pip install pyarrow`, or convert the file to JSONL (one JSON object per "
                          f"line)") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError that names no file
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    for row_number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {row_number}", row


def _check_messages(messages: list, location: str, key: str) -> list[dict]:
    for position, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{location}: {key!r}[{position}] = {message!r} is not a chat message; each "
                             f"message must be an object with string 'role' and 'content'")
    if not messages:
        raise ValueError(f"{location}: {key!r} is an empty chat list; give at least one message")
    return messages


def read_prompt_records(path: str, *, prompt_key: str = "prompt",
                        answer_key: str = "answer") -> list[PromptRecord]:
    """The records of a .parquet file or a JSONL file (any other name); blank lines are skipped.

    Raises FileNotFoundError for a missing file and ValueError naming the line for invalid JSON, a
    line that is not an object or not UTF-8, a missing key (listing the keys present), a prompt that is
    neither a string nor a chat list, an empty prompt (blank text or chat contents), an answer that is neither a string nor a number, and a file with no records.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"prompt file {path!r} is a directory; pass the path of a JSONL or Parquet file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist (working directory {os.getcwd()!r}); "
                                f"pass the path of a JSONL or Parquet file")
    rows = _parquet_rows(path) if path.endswith(".parquet") else _jsonl_rows(path)
    records = []
    for location, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{location}: expected a JSON object with keys {prompt_key!r} and "
                             f"{answer_key!r}, got a {type(row).__name__}")
        prompt = _field(row, prompt_key, location, _KEY_FLAGS["prompt"])
        answer = _field(row, answer_key, location, _KEY_FLAGS["answer"])
        if isinstance(prompt, list):
            prompt = _check_messages(prompt, location, prompt_key)
        elif not isinstance(prompt, str):
            raise ValueError(f"{location}: {prompt_key!r} is a {type(prompt).__name__}; it must be a string "
                             f"or a list of chat messages (--prompt-key names the field)")
        if not _text_of(prompt).strip():
            raise ValueError(f"{location}: {prompt_key!r} is empty; every prompt needs text (drop the line "
                             f"or fill it in)")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{location}: {answer_key!r} = {answer!r} must be a string or a number "
                             f"(--answer-key names the field; a dotted path reaches into nested objects)")
        records.append(PromptRecord(prompt=prompt, answer=str(answer), location=location))
    if not records:
        raise ValueError(f"prompt file {path!r} holds no records; it must contain at least one JSON object")
    return records


def _field(row: dict, key: str, location: str, flag: str):
    """row[key], or the value at the dotted path key ("reward_model.ground_truth") in nested objects."""
    if key in row:
        return row[key]
    value, walked = row, []
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            where = f" in {'.'.join(walked)!r}" if walked else ""
            present = sorted(value) if isinstance(value, dict) else f"none: it is a {type(value).__name__}"
            raise ValueError(f"{location}: missing key {part!r}{where} (keys present: {present}); set {flag} "
                             f"to the field that holds it (a dotted path like reward_model.ground_truth "
                             f"reaches into nested objects)")
        value, walked = value[part], walked + [part]
    return value


def check_chat_template(chat_template: str) -> str | None:
    """The Jinja text of a --chat-template FILE (None for "auto" / "none"); ValueError naming the flag."""
    if chat_template in CHAT_TEMPLATE_MODES:
        return None
    if not os.path.isfile(chat_template):
        raise ValueError(f"--chat-template {chat_template!r}: no such file; give auto (the tokenizer's own "
                         f"template), none (plain text) or the path of a Jinja chat-template file")
    with open(chat_template, encoding="utf-8") as f:
        text = f.read()
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"--chat-template {chat_template}: holds no Jinja markup ({{{{ }}}} or {{% %}}); "
                         f"it must be a chat template like the chat_template of a tokenizer_config.json")
    return text


def _text_of(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else "".join(message["content"] for message in prompt)


def check_template(template: str) -> None:
    if PROMPT_PLACEHOLDER not in template:
        raise ValueError(f"template={template!r} has no {PROMPT_PLACEHOLDER!r}; it must say where the "
                         f"prompt goes")


def apply_template(template: str, prompt: str | list[dict]) -> str | list[dict]:
    """The template with "{prompt}" replaced by the prompt (other braces are kept as written, so
    "\\boxed{}" needs no escaping); for a chat list, applied to the content of the last user message."""
    check_template(template)
    if isinstance(prompt, str):
        return template.replace(PROMPT_PLACEHOLDER, prompt)
    user_positions = [i for i, message in enumerate(prompt) if message["role"] == "user"]
    if not user_positions:
        return prompt
    last = user_positions[-1]
    messages = [dict(message) for message in prompt]
    messages[last]["content"] = template.replace(PROMPT_PLACEHOLDER, messages[last]["content"])
    return messages


def tokenize_prompt(tokenizer, prompt: str | list[dict], chat_template: str = "auto",
                    template_text: str | None = None) -> list[int]:
    """Token ids of a prompt. A text prompt keeps the tokenizer's special tokens (e.g. BOS); a chat
    list is rendered with the chat template and the generation prompt (the template writes the special
    tokens) — the tokenizer's own under "auto", `template_text` (a --chat-template file's, which also
    takes text prompts as one user message) — or, under "none" or with no template at all, is the
    messages' contents joined by blank lines."""
    if template_text is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, chat_template=template_text, tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n\n".join(message["content"] for message in prompt))["input_ids"])


def load_prompt_set(path: str, tokenizer, *, prompt_key: str = "prompt", answer_key: str = "answer",
                    template: str = PROMPT_PLACEHOLDER, max_prompt_tokens: int | None = None,
                    chat_template: str = "auto") -> PromptSet:
    """Read, template and tokenize a prompt file (chat lists rendered per `chat_template`: the module
    docstring); prompts of more than max_prompt_tokens tokens are dropped (counted in
    PromptSet.num_dropped and logged). ValueError when none is left."""
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be ≥ 1 (or None for no limit)")
    check_template(template)
    template_text = check_chat_template(chat_template)
    records = read_prompt_records(path, prompt_key=prompt_key, answer_key=answer_key)
    prompts, answers, shortest_dropped = [], [], None
    for record in records:
        token_ids = tokenize_prompt(tokenizer, apply_template(template, record.prompt), chat_template,
                                    template_text)
        if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
            shortest_dropped = min(len(token_ids), shortest_dropped or len(token_ids))
            continue
        prompts.append(token_ids)
        answers.append(record.answer)
    num_dropped = len(records) - len(prompts)
    if not prompts:
        raise ValueError(f"{path}: all {len(records)} prompts are longer than max_prompt_tokens="
                         f"{max_prompt_tokens} (the shortest has {shortest_dropped} tokens); raise "
                         f"--max-prompt-tokens or shorten --prompt-template")
    if num_dropped:
        logger.warning("%s: dropped %d of %d prompts longer than max_prompt_tokens=%d", path, num_dropped,
                       len(records), max_prompt_tokens)
    return PromptSet(prompts=prompts, answers=answers, source=os.fspath(path), num_dropped=num_dropped)


class PromptSampler:
    """Draws prompt indices without replacement within an epoch, this DP rank's share of them.

    Epoch e is one permutation of range(num_prompts), drawn from a generator seeded with (seed, e):
    the same on every DP rank. Rank r of R takes its contiguous slice perm[r·k : (r+1)·k], k = n // R,
    so the ranks never share a prompt within an epoch, move through epochs at the same rate, and
    together see each prompt at most once per epoch (the n mod R left over differ from epoch to epoch). A
    draw crossing the end of the slice takes its rest, then continues in the next epoch's slice (so
    it can repeat a prompt only if it spans two epochs). The state (epoch, position) is all a
    checkpoint needs: the permutations are recomputed from the seed."""

    def __init__(self, num_prompts: int, *, seed: int = 0, rank: int = 0, num_ranks: int = 1):
        if num_prompts < 1:
            raise ValueError(f"num_prompts={num_prompts} must be ≥ 1; the prompt set is empty")
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank={rank} must lie in [0, num_ranks={num_ranks})")
        if num_prompts < num_ranks:
            raise ValueError(f"{num_prompts} prompts cannot be split over {num_ranks} data-parallel ranks "
                             f"(each needs at least one); use a larger prompt set or fewer DP ranks")
        self.num_prompts, self.seed, self.rank, self.num_ranks = num_prompts, int(seed), rank, num_ranks
        self.epoch = 0                     # number of permutations drawn so far
        self._slice: list[int] = []
        self._position = 0

    def state_dict(self) -> dict:
        """Where the sampler stands (for a checkpoint): the epoch and the position in its slice."""
        return {"epoch": self.epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        if "order" in state:  # written before the DP partition: its permutation is not recomputable
            warnings.warn("the checkpoint's prompt sampler predates the data-parallel partition: the "
                          "resumed run starts a new epoch of prompts instead of finishing the saved one",
                          stacklevel=2)
            self.restart_at(int(state["epoch"]))
            return
        self.epoch, self._position = int(state["epoch"]), int(state["position"])
        self._slice = self._epoch_slice(self.epoch) if self.epoch else []
        self._position = min(self._position, len(self._slice))

    def restart_at(self, step: int) -> None:
        """A fresh epoch (seeded by step, identical on every rank) for a resume in another layout,
        whose saved positions cannot be mapped onto this one's slices."""
        self.epoch, self._slice, self._position = 1_000_000 + int(step), [], 0

    def _epoch_slice(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_prompts, generator=generator).tolist()
        share = self.num_prompts // self.num_ranks
        return order[self.rank * share:(self.rank + 1) * share]

    def draw(self, count: int) -> list[int]:
        if count < 1:
            raise ValueError(f"count={count} must be ≥ 1")
        indices = []
        while len(indices) < count:
            if self._position == len(self._slice):
                self.epoch += 1
                self._slice, self._position = self._epoch_slice(self.epoch), 0
            take = min(count - len(indices), len(self._slice) - self._position)
            indices.extend(self._slice[self._position:self._position + take])
            self._position += take
        return indices
