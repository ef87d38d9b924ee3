"""How the samples a person reads are drawn: at the end of `train` (before and after), in the report, and by
`generate` without flags. Seeded sampling with a repetition penalty: greedy decoding of a small or briefly trained
model repeats one phrase ("北京北京北京…") even when the held-out loss fell, which reads as a broken run. The seed
makes each sample repeat exactly (same prompts, batch and device). The smoke test keeps its own, deterministic,
greedy checks (`job.model.generate.smoke`).

No torch import: the CLI reads these for its option defaults."""

READING_SAMPLES = {
    "greedy": False,
    "top_k": 50,
    "top_p": 0.95,
    "temperature": 0.8,
    "repetition_penalty": 1.3,
    "seed": 0,
}


def describe(settings: dict = READING_SAMPLES) -> str:
    """One line for a report: how its samples were drawn."""
    if settings["greedy"]:
        return f"greedy, repetition penalty {settings['repetition_penalty']}"
    return (
        f"sampled with seed {settings['seed']}: temperature {settings['temperature']}, top-k {settings['top_k']}, "
        f"top-p {settings['top_p']}, repetition penalty {settings['repetition_penalty']}"
    )
