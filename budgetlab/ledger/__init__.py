"""The SQLite ledger (DESIGN section 5): the only code that speaks SQL.

    from budgetlab.ledger import Ledger
    led = Ledger("ledger.db")
    led.stages(grid="quickstart")        # [Stage], the data model of budgetlab.datamodel
    led.apply(Transition(...))           # every state write, checked by budgetlab.lifecycle

Modules: schema (tables, migrations), core (the Ledger), readonly (`ledger sql`).
"""

from budgetlab.datamodel import Grid
from budgetlab.ledger.core import Ledger
from budgetlab.ledger.readonly import query_readonly
from budgetlab.ledger.schema import SCHEMA_VERSION

__all__ = ["Ledger", "Grid", "query_readonly", "SCHEMA_VERSION"]
