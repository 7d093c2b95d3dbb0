"""The driver's side of the rendezvous (app/rendezvous.py): its table served over the signed protocol."""

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from .guard import PlainJSON, SignedApi, ThreadServer, error, plain_errors
from .rendezvous import LONG_POLL_S, MAX_VALUE, Full, Table, TableStore, pack, rendezvous_url, unpack
from .security import Verifier, receiver_name


class Op(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(default="", max_length=1024)
    keys: list[str] = Field(default_factory=list, max_length=1024)
    value: str = Field(default="", max_length=MAX_VALUE * 2)
    expected: str = Field(default="", max_length=MAX_VALUE * 2)
    amount: int = Field(default=0, ge=-(2**62), le=2**62)
    wait_s: float = Field(default=0.0, ge=0.0, le=LONG_POLL_S)


def create_app(table: Table, verifier: Verifier):
    app = FastAPI(title="llmd rendezvous", default_response_class=PlainJSON, openapi_url=None, docs_url=None,
                  redoc_url=None)
    plain_errors(app)

    def get(op: Op):
        value = table.get(op.key, op.wait_s)
        return None if value is None else pack(value)

    ops = {
        "set": lambda op: table.set(op.key, unpack(op.value)),
        "get": get,
        "check": lambda op: table.check(op.keys),
        "add": lambda op: table.add(op.key, op.amount),
        "compare_set": lambda op: pack(table.compare_set(op.key, unpack(op.expected), unpack(op.value))),
        "delete": lambda op: table.delete(op.key),
        "count": lambda op: table.count(),
    }

    @app.post("/v1/rendezvous/{name}")
    def run(name: str, op: Op):
        if name not in ops:
            return error(404, f"no rendezvous operation {name!r}"[:200])
        try:
            return {"result": ops[name](op)}
        except (Full, ValueError) as e:
            return error(400, str(e))

    return SignedApi(app, verifier)


class Rendezvous:
    """The driver's side: the table, served on `address` while the ranks join."""

    def __init__(self, address: str, key: str, launch_id: str, timeout_s: float):
        self.table, self.launch_id = Table(), launch_id
        self._server = ThreadServer(address)
        self.port = self._server.port
        self._server.start(create_app(self.table, Verifier(key, receiver_name(launch_id, address, self.port))))
        self.store = TableStore(self.table, timeout_s)

    @property
    def url(self) -> str:
        return rendezvous_url(self._server.address, self.port)

    def close(self) -> None:
        """Stop serving: from here on the ranks talk only over the collectives' own connections."""
        if self._server is not None:
            self._server.close()
            self._server = None
