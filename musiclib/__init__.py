"""musiclib: a music library server and its client, on trio.

The layers point one way: ``cli`` -> ``client``/``server``/``player`` ->
``protocol``/``library``/``decode`` -> ``errors``. See PROTOCOL.md for the wire
format and WRITEUP.md for why things are the way they are.
"""

__version__ = "0.1.0"
#: where clients look for a server unless told (``--server``, ``MUSICLIB_SERVER``)
DEFAULT_SERVER = "127.0.0.1:7650"
