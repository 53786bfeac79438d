"""User-defined objectives (``kind: python``) used by the tests."""


def kindness(prompts, responses):
    """Count of kind words minus unkind ones."""
    good, bad = {"kind", "good", "great", "calm", "love", "happy", "thanks"}, {"bad", "hate", "stupid", "idiot", "damn"}
    return [sum((w in good) - (w in bad) for w in r.split()) for r in responses]


def brevity(prompts, responses):
    """Minus the number of words."""
    return [-len(r.split()) for r in responses]


def broken_nan(prompts, responses):
    """Returns NaN for every response."""
    return [float("nan")] * len(responses)


def broken_shape(prompts, responses):
    """Returns one value too few."""
    return [0.0] * (len(responses) - 1)


def broken_raise(prompts, responses):
    """Raises, as a user's function with a bug does."""
    raise KeyError("score")


def constant(prompts, responses):
    """The same score for every answer: an objective that cannot be normalised."""
    return [0.0] * len(responses)
