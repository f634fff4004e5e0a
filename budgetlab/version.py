"""The package's version and the schema version of stage identities, apart from the package's
__init__ (which imports the API) so that any module can read them without a cycle."""

__version__ = "0.1.0"
SCHEMA_VERSION = 2   # of stage identities and spec.json (2: a stage hashes only the data it reads)
