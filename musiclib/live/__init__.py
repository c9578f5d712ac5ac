"""Live audio: sources read once, stamped chunks, and the fan-out to many listeners.

Imports point one way: ``channels`` uses ``sources``, ``convert`` and ``hub``;
``hub`` and ``pacing`` use nothing of musiclib but the audio format. No
module here touches a socket: the server's sessions do (``musiclib.server``).

- :mod:`.hub`: one source, many listeners, a bounded queue per listener that
  drops the oldest audio and says exactly how much (``Gap``);
- :mod:`.pacing`: a clock-driven pacer, shared with real-time decoded streams;
- :mod:`.sources`: the readers (a library track or query, any ffmpeg input, a
  microphone), each publishing into a hub;
- :mod:`.convert`: one ffmpeg per distinct listener format;
- :mod:`.channels`: the named channels of a server and their lives.
"""
