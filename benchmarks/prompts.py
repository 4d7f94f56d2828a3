"""Benchmark prompts, one per category (written for this project)."""

CODE = '''def process_orders(orders):
    total = 0
    for order in orders:
        if order["status"] == "paid":
            total += order["amount"]
        elif order["status"] == "refunded":
            total -= order["amount"]
    return total


def summarize(orders):
    paid = [o for o in orders if o["status"] == "paid"]
    return {"count": len(paid), "total": process_orders(orders)}
'''

ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes planned for the river district. "
    "Supporters said the lanes would cut traffic and make the streets safer for children walking to school. "
    "Shop owners worried that removing parking spaces would hurt their business, especially in winter. "
    "After three hours of debate, the council voted six to three to build the lanes, but asked the transport "
    "office to add forty new parking spaces near the market and to report back on traffic in one year."
)

TABLE = """| Country | Capital | Population (millions) | Currency |
|---|---|---|---|
| France | Paris | 68 | Euro |
| Japan | Tokyo | 125 | Yen |
| Brazil | Brasilia | 203 | Real |
| Canada | Ottawa | 40 | Canadian dollar |
| Kenya | Nairobi | 55 | Shilling |"""

CATEGORIES: dict[str, str] = {
    "code editing": "Rename the variable `total` to `balance` in the following Python code. "
                    f"Return the complete updated code.\n\n```python\n{CODE}```",
    "summarisation": f"Summarize the following article in two sentences.\n\n{ARTICLE}",
    "table extraction": f"From the table below, list each country with its capital and currency.\n\n{TABLE}",
    "open-ended chat": "What are some good habits for staying healthy while working from home?",
}
