"""VQA answer normalisation and accuracy, as in the standard VQA evaluation.

The normalisation follows the VQA challenge's evaluation script (Antol et al., 2015, arXiv:1505.00468;
Goyal et al., 2017, arXiv:1612.00837): lower case, punctuation handling that keeps decimal points and
digit groups, number words to digits, articles dropped, and common contractions restored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_answer", "vqa_accuracy"]

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    """The VQA evaluation's punctuation step: strip or space out punctuation, drop periods that end words."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    """The VQA evaluation's word step: lower-case, number words to digits, drop articles, fix contractions."""
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise an answer string as the VQA evaluation does.

    Parameters
    ----------
    text : str
        A predicted or reference answer.

    Returns
    -------
    str
        Lower case; newlines and tabs to spaces; punctuation removed (or turned into a space when it
        separates words), keeping decimal points and digit-group commas out of the way; number words
        ``zero``..``ten`` (and ``none``) to digits; articles ``a``, ``an``, ``the`` dropped; common
        contractions written with their apostrophe.

    Raises
    ------
    TypeError
        If ``text`` is not a string.

    Examples
    --------
    >>> normalize_answer("Two dogs."), normalize_answer("the Red  circle"), normalize_answer("dont")
    ('2 dogs', 'red circle', "don't")
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer is a string, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Standard VQA accuracy of one prediction against the reference (human) answers.

    .. math::

        \\mathrm{acc}(a) = \\min\\left(\\frac{\\#\\{\\text{humans that said } a\\}}{3}, 1\\right)

    Parameters
    ----------
    prediction : str
        The model's answer (normalised here).
    answers : sequence of str
        The reference answers (normalised here), e.g. the 10 human answers of VQAv2.

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        If ``answers`` is empty.

    Notes
    -----
    With 4 or more reference answers (VQAv2 has 10) this is the official metric: the formula above
    averaged over the ``n`` subsets of ``n - 1`` answers (leave one human out), so 3 matching humans
    out of 10 give 0.9 and 4 or more give 1.0. With 1 to 3 reference answers (datasets with a single
    ground truth, such as the testbed, or a short list of synonyms) the threshold 3 would make a
    correct answer score below 1, so the score is ``min(#matches / n, 1)`` with ``n`` the number of
    references: a single reference is exact match after normalisation. This small-``n`` rule is our
    choice; the VQA papers define the metric for 10 answers only. Cost: O(n) string comparisons.

    References
    ----------
    Antol et al., "VQA: Visual Question Answering", arXiv:1505.00468.

    Examples
    --------
    >>> vqa_accuracy("two", ["2"] * 3 + ["3"] * 7)
    0.9
    >>> vqa_accuracy("Red.", ["red"])
    1.0
    """
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    n = len(refs)
    if n <= 3:
        return min(sum(r == pred for r in refs) / n, 1.0)
    matches = [r == pred for r in refs]
    total = sum(matches)
    return sum(min((total - m) / 3.0, 1.0) for m in matches) / n
