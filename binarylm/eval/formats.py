r"""The standard benchmarks, read from their local files into evaluation items.

Each reader takes the rows of a data set in its published Hugging Face schema (exported as
JSON, JSONL or parquet) and writes them as `ChoiceItem`s or `GenerationItem`s (eval/items.py),
framed the way lm-evaluation-harness frames them, so that our figures can be compared with
published ones. In the multiple-choice tasks each option is scored as a continuation of a
context, and a continuation starts with the space that separates it from the context.

    HellaSwag   commonsense sentence completion: which of four endings follows a short scene
                from ActivityNet captions or WikiHow?  Context "{activity_label}: {ctx}",
                continuations " {ending}". The WikiHow rows carry markup such as "[title]" and
                "[step]"; " [title]" becomes ". ", other bracketed tags are dropped and double
                spaces are closed, as the harness does. Fields: activity_label, ctx_a + ctx_b
                (or ctx), endings, label.
    ARC         grade-school science questions (Easy and Challenge sets, same schema).
                Context "Question: {question}\nAnswer:", continuations " {choice text}";
                answerKey is one of choices.label, a letter or (in some rows) a digit.
    MMLU        57 subjects of exam questions, four choices each. The context is the header
                "The following are multiple choice questions (with answers) about {subject}.",
                a blank line, the question, the choices lettered "A. ..." to "D. ..." and
                "Answer:"; the continuations are the letters " A" to " D", so the model has to
                name the answer rather than repeat it. (Rows with more choices get more letters.)
    PIQA        physical commonsense: which of two solutions reaches the goal?  Context
                "Question: {goal}\nAnswer:", continuations " {sol1}" and " {sol2}".
    Winogrande  pronoun-style fill-in-the-blank: the sentence has one "_" and two candidate
                names. Scored by partial scoring: each option's context is the sentence up to
                the blank with that option filled in, and both share one continuation, the rest
                of the sentence as it appears (" was going out." or "'s ride."), so the model
                judges which filling makes the rest likelier. (The harness strips that rest and
                puts a space in front; we keep it verbatim, which differs only when the blank is
                not followed by a single space.)
    GSM8K       grade-school maths word problems, answered by generation. Prompt
                "Question: {question}\nAnswer:"; the reference is the number after "####" on
                the answer's last line, commas removed; as a solved example the question is
                followed by the whole worked answer, so few-shot prompts teach the model to
                reason step by step and end with "#### N".

Every item's `source` is "file, line N" (JSON list: "file, item N"; parquet: "file, row N",
counting from 1), and a record that does not fit its schema stops the read with a message
naming that place, the problem and the fields such a record has:

    items = read_benchmark("arc_easy", "data/ARC-Easy-validation.jsonl")
    items[0].options[0]   # (context, continuation): ("Question: Which ...?\nAnswer:", " a ruler")

For data sets of your own, describe the task in a small YAML file instead (eval/custom.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from binarylm.data.records import json_records
from binarylm.errors import BinaryLMError
from binarylm.eval.items import ChoiceItem, GenerationItem

Item = ChoiceItem | GenerationItem
Row = tuple[str, dict]  # ("file, line N", record)

JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIX = ".parquet"
GSM8K_STOP = ("\n\n", "Question:")
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


# ---------------------------------------------------------------------------------------------
# Rows from a file


def read_rows(path: str | Path, shape: str = "evaluation") -> list[Row]:
    """(place, record) for each record of a JSON, JSONL or parquet file; `shape` names the records in errors."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == PARQUET_SUFFIX:
        rows = _parquet_rows(path)
    elif suffix in JSON_SUFFIXES:
        rows = json_records(path, shape)
    else:
        raise BinaryLMError(f"{path}: cannot read '{suffix or 'no suffix'}' files; "
                            f"give a .jsonl, .json or .parquet file of {shape} records")
    if not rows:
        raise BinaryLMError(f"{path}: no records; expected {shape} records, one JSON object per line "
                            f"(or a JSON list, or a parquet table)")
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise BinaryLMError(f"{path}: reading parquet needs pyarrow; pip install 'binarylm[eval]'") from None
    if not path.is_file():
        raise BinaryLMError(f"{path} is not a file; give a parquet file exported from the data set")
    try:
        records = parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types (ArrowInvalid, OSError) for a damaged file
        raise BinaryLMError(f"{path}: not a readable parquet file ({error})") from None
    return [(f"{path}, row {number}", record) for number, record in enumerate(records, start=1)]


# ---------------------------------------------------------------------------------------------
# Field checks shared by every reader


class _RecordProblem(Exception):
    """What is wrong with one record; `Benchmark` adds the place and the schema to make the user's message."""


@dataclass(frozen=True)
class _Kind:
    """A type a field may hold, and how to say it in an error."""

    description: str
    accepts: Callable[[object], bool]


TEXT = _Kind("a string", lambda value: isinstance(value, str))
TEXTS = _Kind("a list of strings", lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value))
OBJECT = _Kind("an object", lambda value: isinstance(value, dict))
NUMBER = _Kind("an integer or a string of digits",
               lambda value: isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)))


def _field(record: dict, name: str, kind: _Kind, shown: str | None = None) -> object:
    """record[name], checked to be present (not null) and of `kind`; `shown` names a nested field in errors."""
    shown = shown or name
    if record.get(name) is None:
        raise _RecordProblem(f"missing field '{shown}'")
    value = record[name]
    if not kind.accepts(value):
        raise _RecordProblem(f"field '{shown}' should be {kind.description}, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _choice_index(value: int | str, count: int, name: str, first: int = 0) -> int:
    """A label (an int or a digit string, numbering the choices from `first`) as a 0-based index."""
    if isinstance(value, str):
        if not value.strip():
            raise _RecordProblem(f"field '{name}' is empty (test splits are unlabelled; use the validation split)")
        if not value.strip().lstrip("-").isdigit():
            raise _RecordProblem(f"field '{name}' should be a number from {first} to {first + count - 1}, "
                                 f"got {value!r}")
        value = int(value)
    if not first <= value < first + count:
        raise _RecordProblem(f"field '{name}' is {value}, out of range: there are {count} choices, "
                             f"numbered {first} to {first + count - 1}")
    return value - first


def _at_least_two(values: list[str], name: str) -> list[str]:
    if len(values) < 2:
        raise _RecordProblem(f"field '{name}' should hold at least two choices, got {len(values)}")
    return values


def _shared_context(source: str, context: str, continuations: list[str], gold: int,
                    few_shot_text: str | None = None) -> ChoiceItem:
    """The usual multiple-choice item: one context, one continuation per option; solved, the context and the answer."""
    return ChoiceItem(source=source, options=tuple((context, c) for c in continuations), gold=gold,
                      few_shot_text=context + continuations[gold] if few_shot_text is None else few_shot_text)


# ---------------------------------------------------------------------------------------------
# One converter per benchmark: a record in, an item out


def hellaswag_item(source: str, record: dict) -> ChoiceItem:
    label = _field(record, "activity_label", TEXT)
    endings = _at_least_two(_field(record, "endings", TEXTS), "endings")
    gold = _choice_index(_field(record, "label", NUMBER), len(endings), "label")
    context = _hellaswag_clean(f"{label}: {_hellaswag_scene(record)}")
    return _shared_context(source, context, [" " + _hellaswag_clean(ending) for ending in endings], gold)


def _hellaswag_scene(record: dict) -> str:
    """ctx_a + " " + ctx_b, ctx_b capitalized as the harness does; a bare ctx where the split fields are absent."""
    if "ctx_a" in record or "ctx_b" in record:
        first = _field(record, "ctx_a", TEXT)
        second = _field(record, "ctx_b", TEXT) if record.get("ctx_b") is not None else ""  # "" in many WikiHow rows
        return f"{first} {second.capitalize()}"  # str.capitalize also lowercases the rest, as in the harness
    return _field(record, "ctx", TEXT)


def _hellaswag_clean(text: str) -> str:
    """The harness's preprocessing of HellaSwag text: WikiHow's " [title]" ends a sentence, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def arc_item(source: str, record: dict) -> ChoiceItem:
    question = _field(record, "question", TEXT)
    choices = _field(record, "choices", OBJECT)
    texts = _at_least_two(_field(choices, "text", TEXTS, "choices.text"), "choices.text")
    labels = _field(choices, "label", TEXTS, "choices.label")
    if len(labels) != len(texts):
        raise _RecordProblem(f"'choices.label' has {len(labels)} labels for {len(texts)} texts in 'choices.text'")
    key = _field(record, "answerKey", TEXT)
    if key not in labels:
        raise _RecordProblem(f"answerKey {key!r} is not one of the labels {labels}")
    return _shared_context(source, f"Question: {question}\nAnswer:", [" " + text for text in texts],
                           labels.index(key))


def mmlu_item(source: str, record: dict) -> ChoiceItem:
    question = _field(record, "question", TEXT)
    subject = _field(record, "subject", TEXT)
    choices = _at_least_two(_field(record, "choices", TEXTS), "choices")
    if len(choices) > 26:
        raise _RecordProblem(f"field 'choices' has {len(choices)} choices; letters A to Z name at most 26")
    gold = _choice_index(_field(record, "answer", NUMBER), len(choices), "answer")
    letters = [chr(ord("A") + index) for index in range(len(choices))]
    lines = [question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True)]
    body = "\n".join(lines) + "\nAnswer:"
    header = MMLU_HEADER.format(subject=subject.replace("_", " ")) if subject else ""
    # The header is a preamble: a few-shot prompt states the subject once, before its solved examples.
    item = _shared_context(source, body, [" " + letter for letter in letters], gold)
    return dataclasses.replace(item, preamble=header)


def piqa_item(source: str, record: dict) -> ChoiceItem:
    goal = _field(record, "goal", TEXT)
    solutions = [_field(record, "sol1", TEXT), _field(record, "sol2", TEXT)]
    gold = _choice_index(_field(record, "label", NUMBER), 2, "label")
    return _shared_context(source, f"Question: {goal}\nAnswer:", [" " + solution for solution in solutions], gold)


def winogrande_item(source: str, record: dict) -> ChoiceItem:
    sentence = _field(record, "sentence", TEXT)
    names = [_field(record, "option1", TEXT), _field(record, "option2", TEXT)]
    gold = _choice_index(_field(record, "answer", NUMBER), 2, "answer", first=1)
    if "_" not in sentence:
        raise _RecordProblem(f"field 'sentence' has no blank '_' to fill in: {sentence!r}")
    before, rest = sentence.split("_", 1)
    if not rest.strip():
        raise _RecordProblem(f"field 'sentence' has nothing after its blank to score: {sentence!r}")
    options = tuple((before + name, rest) for name in names)
    return ChoiceItem(source=source, options=options, gold=gold, few_shot_text=before + names[gold] + rest)


def gsm8k_item(source: str, record: dict) -> GenerationItem:
    question = _field(record, "question", TEXT)
    worked = _field(record, "answer", TEXT)
    if "####" not in worked:
        raise _RecordProblem("field 'answer' has no final line '#### N' giving the number")
    number = worked.rsplit("####", 1)[1].strip().replace(",", "")
    if not number:
        raise _RecordProblem("field 'answer' has nothing after '####'; its last line should be '#### N'")
    prompt = f"Question: {question}\nAnswer:"
    return GenerationItem(source=source, prompt=prompt, answer=number, stop=GSM8K_STOP,
                          few_shot_text=f"{prompt} {worked}", metadata={"worked_answer": worked})


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Benchmark:
    """A reader: rows of one benchmark's schema in, items out; `fields` is what its records hold, for errors."""

    title: str
    fields: str
    item: Callable[[str, dict], Item]
    article: str = "a"  # "an ARC record", "an MMLU record": by sound, so given rather than derived

    def __call__(self, rows: list[Row]) -> list[Item]:
        items = []
        for source, record in rows:
            try:
                items.append(self.item(source, record))
            except _RecordProblem as problem:
                raise BinaryLMError(f"{source}: {problem}; {self.record_description}") from None
        return items

    @property
    def record_description(self) -> str:
        return f"{self.article} {self.title} record has {self.fields}"


_ARC = Benchmark("ARC", "question, choices {text, label}, answerKey", arc_item, article="an")

BENCHMARKS: dict[str, Benchmark] = {
    "hellaswag": Benchmark("HellaSwag", "activity_label, ctx_a and ctx_b (or ctx), endings, label", hellaswag_item),
    "arc": _ARC,
    "arc_easy": _ARC,
    "arc_challenge": _ARC,
    "mmlu": Benchmark("MMLU", "question, subject, choices (a list), answer (0-based index)", mmlu_item, article="an"),
    "piqa": Benchmark("PIQA", "goal, sol1, sol2, label (0 or 1)", piqa_item),
    "winogrande": Benchmark("Winogrande", "sentence (with one '_'), option1, option2, answer ('1' or '2')",
                            winogrande_item),
    "gsm8k": Benchmark("GSM8K", "question, answer (ending in '#### N')", gsm8k_item),
}


def read_benchmark(name: str, path: str | Path) -> list[ChoiceItem] | list[GenerationItem]:
    """The items of benchmark `name` (a key of BENCHMARKS) from its local JSON, JSONL or parquet file."""
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise BinaryLMError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}. "
                            f"For other data, describe the task in a YAML file (see binarylm/eval/custom.py)")
    benchmark = BENCHMARKS[key]
    return benchmark(read_rows(path, f"{benchmark.title} ({benchmark.fields})"))
