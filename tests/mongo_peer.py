"""A MongoDB wire-protocol peer for tests: mockupdb speaks the protocol on loopback, and each
command it receives is answered from real documents held by mongomock. It records every
command so tests can see exactly what a client sent."""
from __future__ import annotations

from mockupdb import MockupDB
import mongomock

READS = ("find", "aggregate", "listCollections", "listDatabases", "count")


class MongoPeer:
    def __init__(self):
        self.data = mongomock.MongoClient()
        self.commands: list[dict] = []
        self.server = MockupDB(auto_ismaster={"maxWireVersion": 21})
        self.server.autoresponds(self._handle)
        self.server.run()
        self.uri = self.server.uri

    def stop(self) -> None:
        self.server.stop()

    def _handle(self, request) -> bool:
        document = dict(request.doc)
        command = next(iter(document))
        database = document.get("$db", "test")
        if command in ("ismaster", "isMaster", "hello"):
            return False  # mockupdb's own handshake answer (auto_ismaster)
        if command in ("ping", "endSessions", "killCursors", "buildInfo"):
            return request.ok()
        self.commands.append(document)
        if command == "find":
            collection = self.data[database][document["find"]]
            cursor = collection.find(document.get("filter") or {}, document.get("projection") or None)
            if document.get("limit"):
                cursor = cursor.limit(document["limit"])
            return request.ok(cursor={"id": 0, "ns": f"{database}.{document['find']}", "firstBatch": list(cursor)})
        if command == "aggregate":
            rows = list(self.data[database][document["aggregate"]].aggregate(document.get("pipeline", [])))
            return request.ok(cursor={"id": 0, "ns": f"{database}.{document['aggregate']}", "firstBatch": rows})
        if command == "listCollections":
            names = self.data[database].list_collection_names()
            return request.ok(cursor={"id": 0, "ns": f"{database}.$cmd.listCollections",
                                      "firstBatch": [{"name": n, "type": "collection"} for n in names]})
        if command == "listDatabases":
            return request.ok(databases=[{"name": n} for n in self.data.list_database_names()])
        return request.replies({"ok": 0, "code": 13, "codeName": "Unauthorized",
                                "errmsg": f"command {command} is not allowed for this read-only user"})
