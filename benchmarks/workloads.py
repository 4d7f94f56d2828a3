"""Workloads whose text repeats across requests (written for this project, generated with fixed
seeds): what suffix decoding's global trie is for.

* ``json_extraction``: 40 "extract these fields as JSON" requests over different records, one
  schema;
* ``refactoring``: 20 requests to refactor similar functions the same way;
* ``agent_loop``: agent-style conversations that re-send a growing transcript: each step appends
  the model's last answer and a new tool observation (``agent_step``).
"""

from __future__ import annotations

import random

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kenji", "Lina",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
LAST = ["Smith", "Okafor", "Li", "Novak", "Garcia", "Haddad", "Berg", "Sato", "Petrov", "Rossi", "Keller", "Silva"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Denver", "Krakow", "Lyon", "Porto", "Quito", "Perth", "Tallinn"]
JOBS = ["nurse", "carpenter", "data analyst", "teacher", "pilot", "chef", "architect", "pharmacist"]
COMPANIES = ["Northwind", "Blue Harbor", "Acme Tools", "Greenfield Labs", "Orbit Foods", "Stonebridge"]

SCHEMA = "name (string), age (integer), city (string), job (string), company (string), email (string)"


def json_extraction(n: int = 40, seed: int = 1) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        age, city, job, company = rng.randrange(21, 70), rng.choice(CITIES), rng.choice(JOBS), rng.choice(COMPANIES)
        email = f"{first.lower()}.{last.lower()}@{company.lower().replace(' ', '')}.com"
        record = (f"{first} {last} ({age}) moved to {city} last year and now works as a {job} at {company}. "
                  f"You can reach {first} at {email}.")
        convs.append([{"role": "user", "content": f"Extract these fields as a JSON object: {SCHEMA}.\n\n"
                                                  f"Record: {record}\n\nAnswer with the JSON only."}])
    return convs


FUNCS = [("orders", "amount"), ("invoices", "total"), ("payments", "value"), ("refunds", "amount"),
         ("shipments", "weight"), ("tickets", "price"), ("donations", "sum"), ("salaries", "gross"),
         ("expenses", "cost"), ("deposits", "amount")]


def refactoring(n: int = 20, seed: int = 2) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        items, field = FUNCS[i % len(FUNCS)]
        cond = rng.choice(["paid", "approved", "open", "valid"])
        code = (f"def total_{items}({items}):\n"
                f"    result = 0\n"
                f"    for x in {items}:\n"
                f"        if x['status'] == '{cond}':\n"
                f"            result = result + x['{field}']\n"
                f"    return result\n")
        convs.append([{"role": "user", "content": "Refactor this function: add type hints, a docstring, and use "
                                                  f"sum() with a generator expression.\n\n{code}"}])
    return convs


TOOLS = ("You are an agent that answers with one action per turn, as JSON: "
         '{"thought": ..., "action": "search" | "calculator" | "finish", "input": ...}.')
TASKS = ["What is the population of Lisbon times two?", "How tall is the Eiffel Tower in feet?",
         "What year was the Krakow university founded, plus 100?", "How far is Osaka from Tokyo in miles?",
         "What is the boiling point of water in Fahrenheit minus 50?", "How many days are in 7 leap years?",
         "What is the area of a circle of radius 12 cm?", "How many minutes are in a fortnight?"]
OBSERVATIONS = ["Observation: the search returned 3 results; the first says the value is 545,000.",
                "Observation: the calculator returned 1090000.",
                "Observation: the search returned 2 results; the first says 330 meters.",
                "Observation: the calculator returned 1082.68.",
                "Observation: no results; try another query."]


def agent_start(i: int) -> list[dict]:
    return [{"role": "system", "content": TOOLS}, {"role": "user", "content": TASKS[i % len(TASKS)]}]


def agent_step(conv: list[dict], answer: str, step: int) -> list[dict]:
    """The transcript after the model answered ``answer``: the answer and a tool observation."""
    return conv + [{"role": "assistant", "content": answer},
                   {"role": "user", "content": OBSERVATIONS[step % len(OBSERVATIONS)]}]
