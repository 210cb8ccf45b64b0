"""Write ``src/modelmeter/data/entities_sample.jsonl``: the small named-entity sample ``modelmeter quickstart
--with-entities`` (and the README's first tagger) trains on.

CoNLL-2003 may not be shipped in the package (its README says so), so the sample is made here from templates and
lists of names written for it: no third-party text. 800 sentences in the tokens-and-tags form (IOB2 tags of PER,
ORG, LOC), drawn with a fixed seed; support-desk and news phrasing, the business cases the product names.

    python bench/entities_sample.py            # rewrites the file (the same bytes every time)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PEOPLE = ["Maria Lopez", "John Carter", "Aiko Tanaka", "Pierre Dubois", "Fatima Khan", "Lena Schmidt", "Omar Haddad",
          "Grace Okafor", "Tom Becker", "Sofia Rossi", "Daniel Kim", "Priya Nair", "Lucas Silva", "Emma Novak",
          "Ivan Petrov", "Chloe Martin", "Noah Fischer", "Amara Diallo", "Kenji Watanabe", "Julia Costa",
          "Ahmed", "Kowalski", "Ingrid", "Mateo"]
ORGS = ["Northwind Bank", "Acme Logistics", "Bluebird Telecom", "Helios Energy", "Orchid Insurance", "Vertex Motors",
        "Globex", "Initech", "Sunrise Airlines", "Pinecrest Capital", "Redwood Pharma", "Nimbus Cloud",
        "Harbor Freight Lines", "Atlas Media", "Quantum Retail", "Evergreen Foods"]
PLACES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Berlin", "Chicago", "Madrid", "Singapore", "Cape Town", "Oslo",
          "Lyon", "Austin", "Mumbai", "Sao Paulo", "New Zealand", "Bavaria", "Texas", "Ontario"]
TEMPLATES = [
    "{PER} called about a late refund from {ORG} .",
    "My order from {ORG} never arrived in {LOC} .",
    "{ORG} shares fell 4 % after the {LOC} plant closed .",
    "{PER} , who runs support at {ORG} , answered within an hour .",
    "Please send the invoice to {PER} at our {LOC} office .",
    "{ORG} opened a new branch in {LOC} on Monday .",
    "The agent told {PER} that {ORG} would call back .",
    "Flights from {LOC} to {LOC} were cancelled by {ORG} .",
    "{PER} met {PER} in {LOC} to discuss the {ORG} merger .",
    "I have been a customer of {ORG} for ten years and this is the worst service .",
    "{ORG} agreed to buy {ORG} for 2 billion dollars .",
    "Analysts in {LOC} expect {ORG} to raise prices again .",
    "Thanks to {PER} the issue with my {ORG} account is fixed .",
    "{PER} moved from {LOC} to {LOC} last year .",
    "The {LOC} regulator fined {ORG} over data leaks .",
    "Can someone at {ORG} explain why {PER} was charged twice ?",
    "Storms in {LOC} delayed deliveries for {ORG} customers .",
    "{PER} said the outage was not caused by {ORG} .",
    "We are moving our payroll from {ORG} to {ORG} .",
    "Nothing to report today , the weather is fine .",
]
TYPES = {"PER": PEOPLE, "ORG": ORGS, "LOC": PLACES}


def sentence(rng: random.Random, template: str) -> dict[str, list[str]]:
    tokens: list[str] = []
    tags: list[str] = []
    for word in template.split():
        kind = word.strip("{}") if word.startswith("{") else None
        if kind in TYPES:
            name = rng.choice(TYPES[kind]).split()
            tokens += name
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def main() -> None:
    rng = random.Random(2003)
    rows = [sentence(rng, rng.choice(TEMPLATES)) for _ in range(800)]
    out = Path(__file__).resolve().parents[1] / "src/modelmeter/data/entities_sample.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
