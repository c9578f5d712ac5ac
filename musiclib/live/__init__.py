"""Live audio: sources read once, stamped chunks, and the fan-out to many listeners.

Imports point one way: ``requests`` uses ``channels``, which uses
``sources``, ``convert`` and ``hub``; ``hub`` and ``pacing`` use nothing of
musiclib but the audio format. No module here opens a socket: ``requests``
writes through the server's session (``musiclib.server``), and for the direct
path through the plain socket's descriptor that session hands out.

- :mod:`.hub`: one source, many listeners, a bounded queue per listener that
  drops the oldest audio and says exactly how much (``Gap``);
- :mod:`.pacing`: a clock-driven pacer, shared with real-time decoded streams;
- :mod:`.sources`: the readers (a library track or query, any ffmpeg input, a
  microphone), each publishing into a hub;
- :mod:`.convert`: one ffmpeg per distinct listener format;
- :mod:`.channels`: the named channels of a server and their lives;
- :mod:`.requests`: ``channels``, ``listen`` and ``publish`` as the server
  serves them, against a small ``Session`` interface.
"""
