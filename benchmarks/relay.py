"""The dispatch trip with no work in it: what this machine charges for the hops alone.

``bench_dispatch.py`` runs two of these as processes, shaped like its daemons: ``echo`` answers
every length-prefixed frame on a TCP loopback port (as b answers an Offer), ``relay`` takes frames
on a unix socket and passes each to the echo and its answer back (as a does for a control client).
The same event loop as vestad (uvloop where installed), the same asyncio streams, no crypto, no
records, no scheduling: the time a client sees is the floor under vesta's own work.

    python relay.py echo PORT_FILE          # writes the port it listens on to PORT_FILE
    python relay.py relay SOCKET PORT       # listens on SOCKET, forwards to 127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path

HEADER = struct.Struct(">I")


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return await reader.readexactly(size)


async def echo(port_file: Path) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                writer.write(HEADER.pack(len(frame)) + frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))
    await server.serve_forever()


async def relay(socket_path: str, port: int) -> None:
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                up_writer.write(HEADER.pack(len(frame)) + frame)
                answer = await read_frame(up_reader)
                writer.write(HEADER.pack(len(answer)) + answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_unix_server(forward, socket_path)
    await server.serve_forever()


def main() -> None:
    serve = echo(Path(sys.argv[2])) if sys.argv[1] == "echo" else relay(sys.argv[2], int(sys.argv[3]))
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve)
    else:
        uvloop.run(serve)


if __name__ == "__main__":
    main()
