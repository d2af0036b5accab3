"""Write the demo corpus: terms.txt, train.txt and heldout.txt (clinical terms).

    python -m embdeploy.data.make_corpus        # rewrites the three files beside this script

Every term is one the MiniLM tokenizer splits into three or more pieces. Training
sentences and held-out sentences come from disjoint template sets, so the held-out
report measures how well a row generalises, not how well it memorised its contexts.
The output is deterministic (fixed seed); the generated files are shipped.
"""

from __future__ import annotations

import random
from pathlib import Path

TERMS = {
    "condition": [
        "hyperkalemia", "hyponatremia", "hypokalemia", "thrombocytopenia", "pneumothorax",
        "atelectasis", "cholecystitis", "pancreatitis", "cardiomyopathy", "pyelonephritis",
        "osteomyelitis", "ketoacidosis", "nephrolithiasis", "encephalopathy",
    ],
    "finding": [
        "tachycardia", "bradycardia", "arrhythmia", "leukocytosis", "neutropenia",
        "lymphadenopathy", "hepatomegaly", "splenomegaly",
    ],
    "symptom": [
        "dyspnea", "orthopnea", "hemoptysis", "hematemesis", "hematochezia",
        "dysphagia", "odynophagia", "dysarthria",
    ],
    "drug": [
        "warfarin", "enoxaparin", "apixaban", "rivaroxaban", "metformin", "levothyroxine",
        "amiodarone", "furosemide", "spironolactone", "lisinopril", "metoprolol", "atorvastatin",
    ],
    "lab": ["troponin", "creatinine", "bilirubin", "hematocrit"],
    "procedure": ["thoracentesis", "paracentesis", "bronchoscopy", "tracheostomy"],
}

TRAIN = {
    "condition": [
        "The patient was admitted with {t} and monitored overnight.",
        "{T} was confirmed on the second day of the hospital stay.",
        "Her chart lists {t} as the main diagnosis.",
        "We started treatment for {t} in the emergency department.",
        "Severe {t} can become life threatening if it is not treated.",
        "The discharge summary mentions {t} and a follow-up visit.",
        "He has a history of {t} and takes several medications.",
        "Risk factors for {t} were discussed with the family.",
        "The resident presented a case of {t} at morning rounds.",
        "Signs of {t} resolved after three days of therapy.",
        "A consult was requested because of suspected {t}.",
        "Guidelines for managing {t} changed last year.",
    ],
    "finding": [
        "The nurse noted {t} during the evening assessment.",
        "On examination there was marked {t}.",
        "{T} was present on admission and persisted.",
        "The team was concerned about new {t} after surgery.",
        "Persistent {t} prompted further workup.",
        "The report describes mild {t} without other changes.",
        "We documented {t} and informed the attending physician.",
        "Her {t} improved once the infection was treated.",
        "The student asked what usually causes {t}.",
        "Unexplained {t} should not be ignored.",
        "The monitor showed {t} for several hours.",
        "Imaging and labs were ordered to explain the {t}.",
    ],
    "symptom": [
        "The patient complained of {t} since last week.",
        "She reports worsening {t} at night.",
        "{T} began suddenly after dinner.",
        "He denies {t} but mentions fatigue.",
        "The chief complaint was {t} for two days.",
        "New {t} in an older adult needs careful evaluation.",
        "Her {t} was severe enough to visit the clinic.",
        "The doctor asked how long the {t} had lasted.",
        "Episodes of {t} were recorded in the diary.",
        "Mild {t} was reported at the follow-up visit.",
        "The triage note lists {t} as the main symptom.",
        "Treatment eased the {t} within a day.",
    ],
    "drug": [
        "The patient takes {t} every morning.",
        "{T} was started at a low dose.",
        "She stopped taking {t} because of side effects.",
        "The pharmacist reviewed the {t} prescription.",
        "His dose of {t} was increased last month.",
        "We held {t} before the procedure.",
        "Interactions with {t} were checked before discharge.",
        "The label explains how to take {t} safely.",
        "A refill of {t} was sent to the pharmacy.",
        "The cardiologist recommended continuing {t}.",
        "Missing doses of {t} can be dangerous.",
        "The list of home medications includes {t}.",
    ],
    "lab": [
        "The {t} level was elevated on arrival.",
        "A repeat {t} was ordered for the morning.",
        "{T} results came back within normal limits.",
        "The lab called about a critical {t} value.",
        "Her {t} rose over the next twelve hours.",
        "We trended the {t} every six hours.",
        "The {t} measurement was delayed by the lab.",
        "A high {t} changed the treatment plan.",
        "The resident reviewed the {t} before rounds.",
        "His {t} returned to baseline after treatment.",
        "The chart shows a falling {t} this week.",
        "An abnormal {t} was flagged in the report.",
    ],
    "procedure": [
        "The patient underwent {t} yesterday afternoon.",
        "{T} was performed without complications.",
        "Consent for {t} was obtained from the family.",
        "The team scheduled {t} for tomorrow.",
        "After the {t} she was observed for an hour.",
        "A specialist performed the {t} at the bedside.",
        "The risks of {t} were explained in detail.",
        "The report from the {t} was reviewed with the patient.",
        "He needed {t} during his previous admission.",
        "The nurse prepared the room for {t}.",
        "Findings during {t} changed the diagnosis.",
        "Recovery after {t} was faster than expected.",
    ],
}

HELDOUT = {
    "condition": [
        "Doctors suspect {t} in this patient.",
        "My grandmother was treated for {t} last spring.",
        "What are the common symptoms of {t}?",
    ],
    "finding": [
        "The ward doctor wrote down {t} in the notes.",
        "Could the medication be causing the {t}?",
        "Yesterday's exam revealed {t}.",
    ],
    "symptom": [
        "My father has had {t} for a month.",
        "Is {t} a reason to call an ambulance?",
        "The elderly man was troubled by {t}.",
    ],
    "drug": [
        "My doctor prescribed {t} for me.",
        "Should I avoid alcohol while taking {t}?",
        "The clinic switched her to {t}.",
    ],
    "lab": [
        "Can you explain my {t} result?",
        "The {t} test was repeated today.",
        "Doctors check {t} after a heart attack or kidney problems.",
    ],
    "procedure": [
        "My uncle is nervous about his {t}.",
        "How long does a {t} usually take?",
        "The hospital offers {t} on weekdays.",
    ],
}

PER_TERM_TRAIN = 8
SEED = 1234


def fill(template: str, term: str) -> str:
    return template.replace("{t}", term).replace("{T}", term[:1].upper() + term[1:])


def build() -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(SEED)
    terms, train, heldout = [], [], []
    for category, words in TERMS.items():
        assert not set(TRAIN[category]) & set(HELDOUT[category])
        for w in words:
            terms.append(w)
            for tpl in rng.sample(TRAIN[category], PER_TERM_TRAIN):
                train.append(fill(tpl, w))
            for tpl in HELDOUT[category]:
                heldout.append(fill(tpl, w))
    rng.shuffle(train)
    rng.shuffle(heldout)
    return terms, train, heldout


def main(out_dir: Path | None = None) -> None:
    out = Path(out_dir) if out_dir else Path(__file__).parent
    terms, train, heldout = build()
    (out / "terms.txt").write_text("\n".join(terms) + "\n")
    (out / "train.txt").write_text("\n".join(train) + "\n")
    (out / "heldout.txt").write_text("\n".join(heldout) + "\n")
    print(f"{len(terms)} terms, {len(train)} training and {len(heldout)} held-out sentences -> {out}")


if __name__ == "__main__":
    main()
