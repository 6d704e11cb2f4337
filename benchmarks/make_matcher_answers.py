"""Writes src/clinqa/data/bundled/matcher_answers.jsonl: the labelled generated answers the matchers are
measured on (benchmarks/matcher_accuracy.py). Kept so the set can be audited and extended.

Answers are written for this project, to the bundled clinical questions, in the styles small and large
models produce: a letter ("The answer is C"), the option text restated, letter and text, the model's own
paraphrase (written by hand below, one per question, plus a few paraphrases of a wrong option), reasoning
that mentions other options before concluding, hedges, refusals, "none of these", a letter that
contradicts the quoted text, a copy of the option list, a typo in the option text, lower-case letters.
`gold` is the option the answer commits to (not the question's correct answer), or null when it commits
to none (refusal, none-of-these, a hedge between options, a letter/text conflict, a list of options).

    python benchmarks/make_matcher_answers.py   # rewrites the file (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src/clinqa/data/bundled"

# question id -> (option letter, the answer in a model's own words, without the option text verbatim)
PARAPHRASES = {
    "card-001": ("C", "The occlusion is most likely in the RCA, which supplies the inferior wall."),
    "card-002": ("C", "Give an intravenous fluid bolus of saline to support his preload."),
    "card-003": ("B", "He needs a factor Xa inhibitor DOAC for stroke prevention."),
    "card-004": ("D", "Only a vitamin K antagonist is appropriate with a mechanical valve."),
    "card-005": ("D", "Procainamide given intravenously is the safest choice here."),
    "gast-001": ("C", "Variceal banding at endoscopy."),
    "gast-002": ("D", "Antibiotic prophylaxis with a third-generation cephalosporin through a drip."),
    "gast-003": ("A", "A breath test with carbon-13 labelled urea."),
    "gast-004": ("B", "Check tissue transglutaminase IgA antibodies."),
    "gast-005": ("B", "This is dermatitis herpetiformis, which goes with coeliac."),
    "infd-001": ("C", "Amoxicillin is added to cover Listeria."),
    "infd-002": ("C", "A single intramuscular injection of ceftriaxone."),
    "infd-003": ("A", "A macrolide such as azithromycin, because doxycycline is contraindicated in pregnancy."),
    "infd-004": ("D", "Group A streptococcus is the usual cause."),
    "infd-005": ("D", "Take him to theatre urgently to debride the necrotic tissue."),
    "neur-001": ("A", "Four and a half hours."),
    "neur-002": ("C", "Lowering his blood pressure towards a systolic of 140 mmHg."),
    "neur-003": ("C", "A large vessel occlusion in the anterior circulation."),
    "neur-004": ("D", "Give a benzodiazepine: lorazepam IV."),
    "neur-005": ("A", "A second-line IV antiseizure drug, levetiracetam."),
    "obgy-001": ("A", "Magnesium sulphate infusion."),
    "obgy-002": ("C", "Calcium gluconate IV to reverse the magnesium toxicity."),
    "obgy-003": ("D", "Start labetalol, the first-line antihypertensive in pregnancy."),
    "obgy-004": ("B", "Her long-standing high blood pressure."),
    "obgy-005": ("B", "She needs an operation now (laparoscopy) because she is unstable."),
    "peds-001": ("D", "At around a month and a half."),
    "peds-002": ("B", "Roughly one year to fifteen months."),
    "peds-003": ("A", "Live vaccines such as MMR and varicella should be withheld."),
    "peds-004": ("C", "This is bronchiolitis: supportive management, and he can be observed at home."),
    "peds-005": ("C", "One dose of dexamethasone by mouth."),
}
WRONG_PARAPHRASES = [  # models also commit to wrong options, in their own words
    ("card-001", "A", "The LAD is the culprit vessel."),
    ("gast-001", "B", "Inject adrenaline only, nothing else."),
    ("neur-004", "A", "Load him with phenytoin intravenously."),
    ("peds-005", "A", "Salbutamol through a nebuliser."),
    ("infd-002", "A", "Metronidazole tablets by mouth."),
    ("obgy-004", "D", "Her low iron, with anaemia."),
]


def typo(text: str, rng: random.Random) -> str:
    words = text.split()
    i = max(range(len(words)), key=lambda j: len(words[j]))
    w = words[i]
    if len(w) >= 5:
        k = rng.randrange(1, len(w) - 2)
        w = w[:k] + w[k + 1] + w[k] + w[k + 2 :]
    words[i] = w
    return " ".join(words)


def styles(q: dict, target: str, rng: random.Random) -> list[tuple[str, str, str | None]]:
    """(style, answer, gold) candidates for a question, committing to `target` where they commit."""
    opts = q["options"]
    text = opts[target]
    others = [k for k in opts if k != target]
    o1, o2 = rng.sample(others, 2)
    low = text[0].lower() + text[1:] if not text[:2].isupper() else text
    listing = "\n".join(f"{k}. {v}" for k, v in opts.items())
    return [
        (
            "letter",
            rng.choice(
                [
                    f"The answer is {target}.",
                    f"Answer: {target}",
                    f"The correct answer is ({target}).",
                    f"{target}",
                    f"My answer: option {target}.",
                ]
            ),
            target,
        ),
        ("letter-lower", rng.choice([f"answer: {target.lower()}", f"{target.lower()})"]), target),
        (
            "restate",
            rng.choice([f"{text}.", f"{text} is the most appropriate choice.", f"The best option is {low}."]),
            target,
        ),
        (
            "letter-and-text",
            rng.choice([f"{target}. {text}", f"{target}) {text}", f"The answer is {target}, {low}."]),
            target,
        ),
        (
            "reasoning-letter",
            f"{opts[o1]} would not be appropriate in this situation, and {opts[o2].lower()} does not fit "
            f"the findings either. The best choice is {low}, so the answer is {target}.",
            target,
        ),
        (
            "reasoning-text",
            f"{opts[o1]} would not be appropriate in this situation. The best choice here is {low}.",
            target,
        ),
        ("hedge-one", f"I'm not completely sure, but I would go with {low}.", target),
        (
            "hedge-two",
            rng.choice([f"It could be {o1} or {target}; I am not certain.", f"Either {target} or {o2}."]),
            None,
        ),
        (
            "refusal",
            rng.choice(
                [
                    "I'm sorry, but I can't help with medical decisions. Please consult a qualified clinician.",
                    "As an AI, I cannot provide medical advice.",
                    "I cannot answer this question without examining the patient.",
                ]
            ),
            None,
        ),
        (
            "none-of-these",
            rng.choice(
                [
                    "None of these options is correct.",
                    "None of the above.",
                    "No option is appropriate for this patient.",
                ]
            ),
            None,
        ),
        ("conflict", rng.choice([f"The answer is {o1}: {text}.", f"{o1}. {text}"]), None),
        ("lists-options", listing, None),
        ("typo", f"{typo(text, rng)}.", target),
    ]


def main() -> None:
    questions = {}
    for f in sorted(BUNDLED.glob("clinical_*.jsonl")):
        for line in f.read_text().splitlines():
            q = json.loads(line)
            questions[q["id"]] = q
    rng = random.Random(13)
    rows = []
    for qid, (target, para) in PARAPHRASES.items():
        q = questions[qid]
        rows.append(("paraphrase", qid, para, target))
        for style, answer, gold in rng.sample(styles(q, target, rng), 3):
            rows.append((style, qid, answer, gold))
    for qid, target, para in WRONG_PARAPHRASES:
        rows.append(("paraphrase", qid, para, target))
    out = BUNDLED / "matcher_answers.jsonl"
    with out.open("w") as fh:
        for i, (style, qid, answer, gold) in enumerate(rows):
            fh.write(
                json.dumps({"id": f"m{i:03d}", "question_id": qid, "answer": answer, "gold": gold, "style": style})
                + "\n"
            )
    print(f"{len(rows)} answers -> {out}")


if __name__ == "__main__":
    main()
