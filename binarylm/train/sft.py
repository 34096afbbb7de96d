"""Supervised fine-tuning (SFT): teach a pretrained model to answer, one chat at a time.

Each training example is a conversation rendered with the chat template; the loss is the
usual next-token cross-entropy, but only on the tokens selected by `finetune.train_on`
(by default the assistant's replies and their end-of-turn token), so the model learns to
answer rather than to write questions. The examples come from chat files
(`finetune.data`: OpenAI messages, ShareGPT or Alpaca) or, by default, from the built-in
verifiable tasks, whose held-out split is scored by generation before, during and after.
"""

from __future__ import annotations

from binarylm.config import RunConfig
from binarylm.data.chat import pad_examples, read_conversations, render_for_training, to_example
from binarylm.data.synthetic import TaskExample, make_examples, to_conversation
from binarylm.errors import BinaryLMError
from binarylm.train import finetune


def sft(config: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune finetune.base on chat examples until train.max_steps; return the final figures."""
    tuning = finetune.start("sft", config, resume)
    examples = training_examples(config, tuning.tokenizer)
    order = finetune.ExampleOrder(len(examples), config.train.batch_size, config.train.seed)
    if resume:
        finetune.restore(tuning, order)
    pad_id = finetune.pad_token_id(tuning.tokenizer)
    held_out = test_tasks(config)

    def loss(indices: list[int]):
        inputs, targets = pad_examples([examples[i] for i in indices], pad_id)  # (B, T) each
        _, value = tuning.model(inputs.to(tuning.device), targets.to(tuning.device))
        return value, {}

    def evaluate() -> dict:
        if not held_out:
            return {}
        return finetune.task_accuracy(tuning.model, tuning.tokenizer, held_out, config.finetune.max_new_tokens)

    return finetune.train(tuning, order, loss, evaluate, progress)


def training_examples(config: RunConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) token lists, targets -100 where no loss is taken, cut to the longest allowed."""
    tune = config.finetune
    longest = min(tune.max_length or config.model.context_length, config.model.context_length)
    conversations = [conversation for path in tune.data for conversation in read_conversations(path)]
    if not tune.data:
        conversations = [to_conversation(example) for example in train_tasks(config)]
    if not conversations:
        raise BinaryLMError("there is nothing to fine-tune on: give --finetune.data FILE or built-in "
                            "--finetune.tasks with --finetune.train_examples above 0")
    examples = []
    for conversation in conversations:
        rendered = render_for_training(conversation, tokenizer, tune.train_on)
        examples.append(to_example(rendered.ids, rendered.mask, longest))
    return examples


def train_tasks(config: RunConfig) -> list[TaskExample]:
    """finetune.train_examples of each built-in task; a task with fewer distinct prompts (small arithmetic has
    about 640) repeats them, so that every task weighs the same in the mix."""
    tune = config.finetune
    examples = []
    for task in tune.tasks:
        distinct = make_examples(task, tune.train_examples, "train", config.train.seed, at_most=True)
        examples += [distinct[i % len(distinct)] for i in range(tune.train_examples)] if distinct else []
    return examples


def test_tasks(config: RunConfig) -> list[TaskExample]:
    """The held-out built-in tasks scored during training (none when training on files without tasks)."""
    tune = config.finetune
    return [example for task in tune.tasks
            for example in make_examples(task, tune.test_examples, "test", 0, at_most=True)]
