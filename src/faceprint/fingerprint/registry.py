"""Registry of issued fingerprints (papers/004, Sec. 5.3 and Sec. 6.1).

The model inventor keeps a private database of the code given to each model instance; a
decoded code is matched against it to attribute a face to an instance (Sec. 5.5.6-5.5.7,
Sec. 6.4). Here the database is a real SQL database reached through SQLAlchemy 2.x: a SQLite
file by default, or PostgreSQL with a URL such as ``postgresql+psycopg://user@host/db``; the
schema is the same on both and is created on first use.

Table ``faceprint_fingerprints``, one row per issued code:

  code        128-bit code as 32 lowercase hex characters (unique)
  instance    name of the model instance that carries it (unique)
  recipient   who received the instance
  model_hash  sha256 (64 hex) of the base model file, see :func:`faceprint.io.sha256_file`
  mechanism   name of the fingerprinting mechanism that embeds the code
  issued_at   UTC time, ISO 8601 (seconds)
  note        optional free text

Bit order: bit i of a code is bit (7 - i % 8) of byte i // 8 of its 16 big-endian bytes, i.e.
``numpy.packbits`` order; the hex string is those bytes in order. A code as a tensor is a
(128,) torch.bool.

Issuing is serialised: on SQLite the write transaction starts with ``BEGIN IMMEDIATE`` (one
writer at a time, others wait up to ``busy_timeout`` seconds); on PostgreSQL it takes a
``SHARE ROW EXCLUSIVE`` lock on the table, which excludes other issuers and inserts but not
readers. The distance check and the insert therefore see the same set of codes, and the
unique constraints are the last line of defence (a violation rolls back and retries).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError, ConfigError, InputError
from ..io import now_iso
from ..seeding import check_seed
from . import CODE_BITS

HEX_CHARS = CODE_BITS // 4
SCHEMA_VERSION = 1
TABLE = "faceprint_fingerprints"
META_TABLE = "faceprint_registry_meta"

DEFAULT_MIN_DISTANCE = 32
"""Default minimum Hamming distance between any two issued codes.

Two independent uniform 128-bit codes are at distance ~ Binomial(128, 1/2) (mean 64, sd 5.7):
P(d < 32) = 2.1e-9, so random draws are almost never rejected (a fresh code conflicts with
one of 10^6 issued codes with probability 0.2 %, and is then simply redrawn). In exchange the
registry guarantees that a decoded code with at most 15 wrong bits is nearer to its own code
than to any other, and it refuses hand-registered near-duplicates. A larger minimum soon
becomes expensive: P(d < 48) = 1.7e-3 per pair, so with 1,000 codes 82 % of draws would be
rejected.
"""

_HEX_RE = re.compile(r"^[0-9a-f]{32}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_MAX = 200
_MECHANISM_MAX = 64


# --------------------------------------------------------------------------------------------
# pure helpers: code <-> hex <-> bool tensor


def _check_bits(bits, name: str = "bits", *, batch: bool | None = False) -> torch.Tensor:
    """Validate a code tensor; batch False: (128,), True: (N, 128), None: either."""
    if not isinstance(bits, torch.Tensor):
        raise InputError(f"{name} must be a torch.bool tensor of shape (128,), got {type(bits).__name__}; use hex_to_code(hex)")
    ok_dims = {False: (1,), True: (2,), None: (1, 2)}[batch]
    shape_txt = {False: "(128,)", True: "(N, 128)", None: "(128,) or (N, 128)"}[batch]
    if bits.dim() not in ok_dims or bits.shape[-1] != CODE_BITS:
        raise InputError(f"{name} must have shape {shape_txt}, got {tuple(bits.shape)}")
    if bits.dtype != torch.bool:
        if bits.dtype.is_floating_point or bits.dtype.is_complex:
            raise InputError(
                f"{name} must be torch.bool (or integer 0/1), got {bits.dtype}; threshold soft outputs first, e.g. bits = logits > 0"
            )
        if bool(((bits != 0) & (bits != 1)).any()):
            raise InputError(f"{name} holds integers other than 0 and 1; pass a torch.bool tensor")
        bits = bits != 0
    return bits.cpu()


def code_to_hex(bits: torch.Tensor) -> str:
    """A (128,) bool code -> 32 lowercase hex characters (numpy.packbits bit order)."""
    bits = _check_bits(bits, "bits")
    return np.packbits(bits.numpy().astype(np.uint8)).tobytes().hex()


def _check_hex(code, name: str = "code") -> str:
    if not isinstance(code, str):
        raise InputError(f"{name} must be a str of 32 hex characters, got {type(code).__name__} {code!r}")
    low = code.strip().lower()
    if not _HEX_RE.match(low):
        raise InputError(
            f"{name} must be 32 hex characters (a 128-bit code), got {code!r} ({len(code)} characters); "
            "use code_to_hex(bits) to write one"
        )
    return low


def hex_to_code(code: str) -> torch.Tensor:
    """32 hex characters (any case) -> (128,) torch.bool code."""
    low = _check_hex(code)
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(low), dtype=np.uint8)).astype(bool))


def hex_to_codes(codes) -> torch.Tensor:
    """A sequence of K hex codes -> (K, 128) torch.bool (K may be 0)."""
    codes = list(codes)
    if not codes:
        return torch.zeros((0, CODE_BITS), dtype=torch.bool)
    raw = b"".join(bytes.fromhex(_check_hex(c, f"codes[{i}]")) for i, c in enumerate(codes))
    arr = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)).astype(bool).reshape(len(codes), CODE_BITS)
    return torch.from_numpy(arr)


def code_to_int(bits: torch.Tensor) -> int:
    """A (128,) bool code -> the integer whose big-endian binary digits are the bits."""
    return int(code_to_hex(bits), 16)


def int_to_code(value: int) -> torch.Tensor:
    """An integer in [0, 2**128) -> (128,) bool code (inverse of :func:`code_to_int`)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**CODE_BITS:
        raise InputError(f"value must be an int in [0, 2**128), got {value!r}")
    return hex_to_code(f"{value:032x}")


def random_code(*, generator: torch.Generator) -> torch.Tensor:
    """A uniform random (128,) bool code drawn with ``generator`` (a CPU torch.Generator)."""
    if not isinstance(generator, torch.Generator):
        raise InputError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; use faceprint.seeding.generator(seed)"
        )
    return torch.randint(0, 2, (CODE_BITS,), generator=generator, dtype=torch.uint8).bool()


def hamming_distances(bits: torch.Tensor, codes: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Hamming distances between N decoded codes and K reference codes.

    Parameters
    ----------
    bits : torch.Tensor
        (N, 128) or (128,) bool.
    codes : torch.Tensor
        (K, 128) or (128,) bool.
    chunk : int
        Rows of ``bits`` per matrix product (bounds memory at chunk x K floats).

    Returns
    -------
    torch.Tensor
        (N, K) int64 (leading dimensions dropped where the inputs were 1-D).
    """
    a = _check_bits(bits, "bits", batch=None)
    b = _check_bits(codes, "codes", batch=None)
    a2 = a[None] if a.dim() == 1 else a
    b2 = b[None] if b.dim() == 1 else b
    bf = b2.float()  # (K, 128)
    out = torch.empty((a2.shape[0], b2.shape[0]), dtype=torch.int64)
    for s in range(0, a2.shape[0], chunk):
        af = a2[s : s + chunk].float()  # (n, 128)
        # d = sum a (1 - b) + (1 - a) b ; exact in float32 (values <= 128)
        d = af @ (1 - bf).T + (1 - af) @ bf.T
        out[s : s + chunk] = d.round().long()
    if a.dim() == 1:
        out = out[0]
        return out[0] if b.dim() == 1 else out
    return out[:, 0] if b.dim() == 1 else out


# --------------------------------------------------------------------------------------------
# entries and config


@dataclass(frozen=True)
class Entry:
    """One issued code. ``code`` is 32 lowercase hex characters; :attr:`bits` is the (128,) bool code."""

    code: str
    instance: str
    recipient: str
    model_hash: str
    mechanism: str
    issued_at: str
    note: str | None = None

    @property
    def bits(self) -> torch.Tensor:
        return hex_to_code(self.code)


@dataclass(frozen=True)
class RegistryConfig:
    """Settings of a :class:`Registry`.

    min_distance: minimum Hamming distance between any two issued codes (see
    :data:`DEFAULT_MIN_DISTANCE` for the choice of 32).  max_draws: random draws tried by
    :meth:`Registry.issue` before it gives up.  busy_timeout: seconds a SQLite writer waits for
    another writer.  max_retries: transactions retried after a unique-constraint race.
    connect_timeout: seconds a connection to a database server may take (an unreachable host
    is then an error, never a hang).
    """

    min_distance: int = DEFAULT_MIN_DISTANCE
    max_draws: int = 1000
    busy_timeout: float = 30.0
    max_retries: int = 5
    connect_timeout: float = 10.0

    def __post_init__(self):
        _check_min_distance(self.min_distance, "min_distance")
        for name, example in (("max_draws", "1000"), ("max_retries", "5")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}; try {example}")
        if isinstance(self.busy_timeout, bool) or not isinstance(self.busy_timeout, (int, float)) or not self.busy_timeout > 0:
            raise ConfigError(f"busy_timeout must be a positive number of seconds, got {self.busy_timeout!r}; try 30")
        t = self.connect_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1e6:
            raise ConfigError(f"connect_timeout must be a positive number of seconds, got {t!r}; try 10")


def _check_min_distance(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= CODE_BITS:
        raise ConfigError(
            f"{name} must be an int in [1, 128] (minimum Hamming distance between issued codes), got {value!r}; "
            f"the default {DEFAULT_MIN_DISTANCE} is free for random codes"
        )
    return value


def _check_name(value, name: str, limit: int = _NAME_MAX) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{name} must be a non-empty str, got {value!r}")
    if len(value) > limit:
        raise InputError(f"{name} must have at most {limit} characters, got {len(value)}; shorten it")
    if value != value.strip():
        raise InputError(f"{name} must not start or end with white space, got {value!r}")
    return value


def _check_model_hash(value) -> str:
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise InputError(
            f"model_hash must be the sha256 of the base model file as 64 lowercase hex characters, got {value!r}; "
            "compute it with faceprint.io.sha256_file(path)"
        )
    return value


def check_entry_fields(recipient, instance, model_hash, mechanism, note=None) -> None:
    """Validate the fields of an entry before anything is written (InputError naming the bad one)."""
    _check_name(recipient, "recipient")
    _check_name(instance, "instance")
    _check_model_hash(model_hash)
    _check_name(mechanism, "mechanism", _MECHANISM_MAX)
    if note is not None and not isinstance(note, str):
        raise InputError(f"note must be a str or None, got {type(note).__name__}")


def _resolve_generator(generator, seed) -> torch.Generator:
    if (generator is None) == (seed is None):
        raise InputError(
            "pass exactly one of generator= (a torch.Generator) or seed= (an int) to draw a code; "
            f"got generator={generator!r}, seed={seed!r}"
        )
    if seed is not None:
        g = torch.Generator(device="cpu")
        g.manual_seed(check_seed(seed))
        return g
    if not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}; or pass seed=0")
    return generator


# --------------------------------------------------------------------------------------------
# the registry


def _tables(schema: str | None):
    from sqlalchemy import CheckConstraint, Column, Integer, MetaData, String, Table, Text, UniqueConstraint

    md = MetaData(schema=schema)
    codes = Table(
        TABLE,
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("code", String(HEX_CHARS), nullable=False),
        Column("instance", String(_NAME_MAX), nullable=False),
        Column("recipient", String(_NAME_MAX), nullable=False),
        Column("model_hash", String(64), nullable=False),
        Column("mechanism", String(_MECHANISM_MAX), nullable=False),
        Column("issued_at", String(40), nullable=False),
        Column("note", Text, nullable=True),
        UniqueConstraint("code", name=f"uq_{TABLE}_code"),
        UniqueConstraint("instance", name=f"uq_{TABLE}_instance"),
        CheckConstraint(f"length(code) = {HEX_CHARS}", name=f"ck_{TABLE}_code_length"),
    )
    meta = Table(
        META_TABLE,
        md,
        Column("key", String(64), primary_key=True),
        Column("value", String(255), nullable=False),
    )
    return md, codes, meta


class Registry:
    """The database of issued fingerprint codes.

    Parameters
    ----------
    url_or_path : str or os.PathLike
        A SQLAlchemy database URL (``sqlite:///registry.db``,
        ``postgresql+psycopg://user:password@127.0.0.1:5432/faceprint``) or the path of a SQLite
        file (created with its tables on first use; its folder must exist).
    config : RegistryConfig, optional
        Minimum code distance, draw and retry limits (default ``RegistryConfig()``).
    schema : str, optional
        PostgreSQL schema holding the tables (created if missing); default: the connection's
        search path. Not available on SQLite.

    Raises
    ------
    InputError
        If the location is not usable or the database cannot be reached.
    ArtifactError
        If the database was written by a newer faceprint (higher schema version).

    Examples
    --------
    >>> reg = Registry("registry.db")                                      # doctest: +SKIP
    >>> entry = reg.issue("alice", "alice-01", sha256_file("model.safetensors"),
    ...                   "latent-fingerprint", seed=7)                    # doctest: +SKIP
    >>> reg.nearest(decoded_bits)                                           # doctest: +SKIP
    (Entry(code='...', instance='alice-01', ...), 3)
    """

    def __init__(self, url_or_path, config: RegistryConfig | None = None, *, schema: str | None = None):
        try:
            import sqlalchemy as sa
        except ImportError:  # pragma: no cover - dependency missing
            raise InputError(
                "the fingerprint registry needs SQLAlchemy 2.x; install it with `pip install 'sqlalchemy>=2.0'`"
            ) from None
        if config is not None and not isinstance(config, RegistryConfig):
            raise InputError(f"config must be a RegistryConfig, got {type(config).__name__}")
        self.config = config or RegistryConfig()
        url = self._url(url_or_path)
        self.url = url.render_as_string(hide_password=True)
        self._backend = url.get_backend_name()
        if self._backend not in ("sqlite", "postgresql"):
            raise InputError(
                f"registry database {self.url!r} uses {self._backend!r}; supported: a SQLite file or "
                "postgresql+psycopg://user@host/db"
            )
        if schema is not None:
            if self._backend != "postgresql":
                raise InputError(f"schema={schema!r} needs a PostgreSQL registry; a SQLite file has no schemas")
            if not isinstance(schema, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", schema):
                raise InputError(f"schema must be a plain SQL identifier (letters, digits, _), got {schema!r}")
        self.schema = schema
        self._md, self._codes, self._meta = _tables(schema)
        self._engine = self._make_engine(sa, url)
        self._ensure_schema()

    # -- engine and schema ----------------------------------------------------------------------
    @staticmethod
    def _url(url_or_path):
        from sqlalchemy.engine import URL, make_url
        from sqlalchemy.exc import ArgumentError

        if isinstance(url_or_path, URL):
            return url_or_path
        if isinstance(url_or_path, str) and "://" in url_or_path:
            try:
                url = make_url(url_or_path)
            except (ArgumentError, ValueError) as e:
                raise InputError(f"registry URL {url_or_path!r} is not a database URL ({e}); e.g. sqlite:///registry.db") from None
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
                Registry._check_sqlite_file(Path(url.database))
            return url
        if not isinstance(url_or_path, (str, Path)) or not str(url_or_path):
            raise InputError(
                f"url_or_path must be a SQLite file path or a database URL, got {type(url_or_path).__name__} {url_or_path!r}"
            )
        path = Path(url_or_path).expanduser()
        if path.is_dir():
            raise InputError(f"registry path {str(path)!r} is a folder; pass a file name such as {str(path / 'registry.db')!r}")
        Registry._check_sqlite_file(path)
        return URL.create("sqlite", database=str(path.resolve()))

    @staticmethod
    def _check_sqlite_file(path: Path) -> None:
        """The SQLite file's folder exists and the file, if present, is a regular file (SQLite
        would block on a FIFO)."""
        import os
        import stat

        if not path.parent.is_dir():
            raise InputError(f"registry folder {str(path.parent)!r} does not exist; create it first or choose another path")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise InputError(f"registry file {str(path)!r} cannot be read ({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"registry file {str(path)!r} is not a regular file (a folder, FIFO, device or socket); "
                             "pass a SQLite file or a database URL")

    def _make_engine(self, sa, url):
        from sqlalchemy import event

        if self._backend == "sqlite":
            kwargs = {"connect_args": {"timeout": float(self.config.busy_timeout)}}
            if url.database in (None, "", ":memory:"):
                from sqlalchemy.pool import StaticPool

                kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False, **kwargs["connect_args"]})
            try:
                engine = sa.create_engine(url, **kwargs)
            except ImportError as e:  # pragma: no cover
                raise InputError(f"cannot open registry {self.url!r}: {e}") from None

            # pysqlite opens transactions lazily and on its own; take control so that a write
            # transaction starts with BEGIN IMMEDIATE (SQLAlchemy 2.x pysqlite recipe).
            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_connection, _record):
                dbapi_connection.isolation_level = None

            @event.listens_for(engine, "begin")
            def _on_begin(conn):
                write = conn.get_execution_options().get("faceprint_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        timeout = max(1, int(math.ceil(self.config.connect_timeout)))
        try:
            return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": timeout})
        except ImportError as e:
            raise InputError(
                f"cannot open registry {self.url!r}: the database driver is missing ({e}); use a URL starting "
                "with postgresql+psycopg:// and install it with `pip install 'psycopg[binary]'`"
            ) from None

    def _unreachable(self, e) -> InputError:
        return InputError(
            f"cannot reach registry database {self.url!r} ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "check that the server runs and the URL (host, port, user, database) is right"
        )

    def _ensure_schema(self) -> None:
        from sqlalchemy import select, text
        from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

        last = None
        for _ in range(3):  # two processes creating the tables at once: the loser retries
            try:
                with self._engine.begin() as conn:
                    if self.schema is not None:
                        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                    self._md.create_all(conn, checkfirst=True)
                    row = conn.execute(select(self._meta.c.value).where(self._meta.c.key == "schema_version")).first()
                    if row is None:
                        conn.execute(self._meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                        version = SCHEMA_VERSION
                    else:
                        version = int(row[0])
                break
            except (IntegrityError, ProgrammingError) as e:
                last = e
                continue
            except OperationalError as e:
                if "already exists" in str(e):
                    last = e
                    continue
                raise self._unreachable(e) from None
            except DBAPIError as e:
                raise self._unreachable(e) from None
        else:
            raise InputError(f"cannot create the registry tables in {self.url!r} ({last}); check the user's rights")
        if version > SCHEMA_VERSION:
            raise ArtifactError(
                f"registry {self.url!r} has schema version {version}, this faceprint reads up to {SCHEMA_VERSION}; upgrade faceprint"
            )

    @contextlib.contextmanager
    def _write(self):
        """A serialised write transaction (see the module docstring)."""
        from sqlalchemy import text

        with self._engine.connect() as conn:
            conn.execution_options(faceprint_write=True)
            with conn.begin():
                if self._backend == "postgresql":
                    name = conn.dialect.identifier_preparer.format_table(self._codes)
                    conn.execute(text(f"LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE"))
                yield conn

    def close(self) -> None:
        """Release the database connections (the registry can no longer be used)."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.url!r}, min_distance={self.config.min_distance})"

    # -- reading ------------------------------------------------------------------------------
    def _rows(self, conn, where=None):
        from sqlalchemy import select

        c = self._codes.c
        q = select(c.code, c.instance, c.recipient, c.model_hash, c.mechanism, c.issued_at, c.note).order_by(c.id)
        if where is not None:
            q = q.where(where)
        return [Entry(*row) for row in conn.execute(q)]

    def all(self) -> list[Entry]:
        """Every issued entry, in issue order."""
        with self._engine.connect() as conn:
            return self._rows(conn)

    def __len__(self) -> int:
        from sqlalchemy import func, select

        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self._codes)).scalar_one())

    def get(self, instance: str) -> Entry:
        """The entry of model instance ``instance``.

        Raises
        ------
        InputError
            If no code was issued to that instance.
        """
        _check_name(instance, "instance")
        with self._engine.connect() as conn:
            rows = self._rows(conn, self._codes.c.instance == instance)
        if not rows:
            raise InputError(f"instance {instance!r} has no code in registry {self.url!r}; list them with Registry.all()")
        return rows[0]

    def codes(self) -> tuple[list[Entry], torch.Tensor]:
        """(entries, their codes as a (K, 128) bool tensor), in issue order."""
        entries = self.all()
        return entries, hex_to_codes(e.code for e in entries)

    def nearest(self, bits: torch.Tensor) -> tuple[Entry, int]:
        """The issued entry nearest to a decoded (128,) bool code, and its Hamming distance.

        Ties go to the earliest issued entry. Raises InputError on an empty registry.
        """
        bits = _check_bits(bits, "bits")
        (entry, d), = self.nearest_many(bits[None])
        return entry, d

    def nearest_many(self, bits: torch.Tensor) -> list[tuple[Entry, int]]:
        """:meth:`nearest` for each row of an (N, 128) bool tensor."""
        bits = _check_bits(bits, "bits", batch=True)
        entries, codes = self.codes()
        if not entries:
            raise InputError(f"registry {self.url!r} holds no codes yet; issue() or register() one first")
        d = hamming_distances(bits, codes)  # (N, K)
        best = d.argmin(1)  # first minimum: earliest issued
        return [(entries[int(k)], int(d[i, k])) for i, k in enumerate(best)]

    # -- writing ------------------------------------------------------------------------------
    def _insert(self, conn, code: str, recipient, instance, model_hash, mechanism, note) -> Entry:
        entry = Entry(code, instance, recipient, model_hash, mechanism, now_iso(), note)
        conn.execute(
            self._codes.insert().values(
                code=entry.code,
                instance=entry.instance,
                recipient=entry.recipient,
                model_hash=entry.model_hash,
                mechanism=entry.mechanism,
                issued_at=entry.issued_at,
                note=entry.note,
            )
        )
        return entry

    def instance_taken(self, instance: str) -> bool:
        """Whether ``instance`` already has a code (a read, no write)."""
        _check_name(instance, "instance")
        with self._engine.connect() as conn:
            return bool(self._rows(conn, self._codes.c.instance == instance))

    def _check_fields(self, recipient, instance, model_hash, mechanism, note):
        check_entry_fields(recipient, instance, model_hash, mechanism, note)

    def _instance_taken(self, conn, instance: str) -> None:
        if self._rows(conn, self._codes.c.instance == instance):
            raise InputError(
                f"instance {instance!r} already has a code in registry {self.url!r}; "
                "choose a new instance name (one code per model instance)"
            )

    def _transact(self, body):
        """Run body(conn) in a serialised write transaction, retrying unique-constraint races."""
        from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

        last = None
        for _ in range(self.config.max_retries):
            try:
                with self._write() as conn:
                    return body(conn)
            except IntegrityError as e:
                last = e
            except OperationalError as e:
                if "locked" in str(e) or "could not serialize" in str(e) or "deadlock" in str(e):
                    last = e
                    continue
                raise self._unreachable(e) from None
            except DBAPIError as e:  # pragma: no cover - server gone
                raise self._unreachable(e) from None
        raise InputError(
            f"could not write to registry {self.url!r} after {self.config.max_retries} attempts "
            f"({last.__class__.__name__}: {str(last).splitlines()[0]}); retry, or raise RegistryConfig.max_retries"
        )

    def issue(
        self,
        recipient: str,
        instance: str,
        model_hash: str,
        mechanism: str,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        note: str | None = None,
        min_distance: int | None = None,
        before_commit=None,
    ) -> Entry:
        """Draw a fresh random code for a new model instance and record it.

        Parameters
        ----------
        recipient, instance, model_hash, mechanism, note
            The row's fields (see the module docstring); ``instance`` must be new.
        generator : torch.Generator, optional
            Draws the code (128 fair coin flips); exactly one of generator or seed.
        seed : int, optional
            Seeds a new generator instead.
        min_distance : int, optional
            Draws at Hamming distance < min_distance from any issued code are rejected and
            redrawn (default ``config.min_distance``, 32). An exact repeat is always rejected.
        before_commit : callable, optional
            Called with the new Entry inside the write transaction, before it commits (e.g. to
            write the instance file): if it raises, nothing is recorded.

        Returns
        -------
        Entry

        Raises
        ------
        InputError
            If ``instance`` already has a code, or a field is invalid.
        ConfigError
            If ``config.max_draws`` draws all fell too close to issued codes (min_distance too large).
        """
        self._check_fields(recipient, instance, model_hash, mechanism, note)
        md = self.config.min_distance if min_distance is None else _check_min_distance(min_distance, "min_distance")
        gen = _resolve_generator(generator, seed)

        def body(conn):
            self._instance_taken(conn, instance)
            entries = self._rows(conn)
            issued = hex_to_codes(e.code for e in entries)
            for _ in range(self.config.max_draws):
                code = random_code(generator=gen)
                if not entries or int(hamming_distances(code, issued).min()) >= md:
                    entry = self._insert(conn, code_to_hex(code), recipient, instance, model_hash, mechanism, note)
                    if before_commit is not None:
                        before_commit(entry)
                    return entry
            raise ConfigError(
                f"{self.config.max_draws} random codes all fell within Hamming distance {md} of the "
                f"{len(entries)} issued codes; lower min_distance (default {DEFAULT_MIN_DISTANCE})"
            )

        return self._transact(body)

    def register(
        self,
        code,
        recipient: str,
        instance: str,
        model_hash: str,
        mechanism: str,
        *,
        note: str | None = None,
        min_distance: int | None = None,
    ) -> Entry:
        """Record a given code (32 hex characters or a (128,) bool tensor) for a new instance.

        Raises
        ------
        InputError
            If the code is within Hamming distance < min_distance (default
            ``config.min_distance``) of an issued code (the message names it), or ``instance``
            already has a code, or a field is invalid.
        """
        hex_code = code_to_hex(code) if isinstance(code, torch.Tensor) else _check_hex(code)
        self._check_fields(recipient, instance, model_hash, mechanism, note)
        md = self.config.min_distance if min_distance is None else _check_min_distance(min_distance, "min_distance")
        bits = hex_to_code(hex_code)

        def body(conn):
            self._instance_taken(conn, instance)
            entries = self._rows(conn)
            if entries:
                d = hamming_distances(bits, hex_to_codes(e.code for e in entries))
                k = int(d.argmin())
                if int(d[k]) < md:
                    raise InputError(
                        f"code {hex_code} is at Hamming distance {int(d[k])} from the code of instance "
                        f"{entries[k].instance!r} (issued {entries[k].issued_at}); codes must be at least {md} apart "
                        "so decoded codes stay attributable: use issue() to draw a fresh one"
                    )
            return self._insert(conn, hex_code, recipient, instance, model_hash, mechanism, note)

        return self._transact(body)
