"""aiortc helpers shared by the server and the SDK (no torch)."""

from __future__ import annotations

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame

JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # aiortc's receiver keeps it in a private field


class FrameAtOnceJitterBuffer(JitterBuffer):
    """aiortc's jitter buffer, handing each frame over as soon as its last packet is in.

    aiortc's own knows a frame is whole only once the first packet of the next one arrives, which holds every frame
    back one frame interval (40 ms of video at 25 fps, 20 ms of audio), and its audio buffer waits for 4 whole frames
    (80 ms in all). It plays nothing out by time, so the waits buy no smoothing: packets come out in order either way,
    reordered ones are put back in order either way, and a lost one holds the rest back until the buffer overflows
    either way. Here an audio packet is a whole frame (one RTP packet per Opus frame) and a video frame ends with the
    packet carrying the RTP marker bit (RFC 7741 for VP8, RFC 6184 for H.264; aiortc's sender and browsers set it);
    a frame whose marker never came is handed over when the next one starts, as aiortc does.

    Like aiortc's, it hands over at most one frame per packet that arrives: a reorder leaves it one frame behind
    (where aiortc's always is) until a frame of several packets catches it up, and frames that queued behind a lost
    packet it waited for stay queued (aiortc's too: that is a receiver's limit, not the buffer's)."""

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:  # the frame is not whole yet
                return None
            if packets and packet.timestamp != packets[0].timestamp:  # its marker never came: the next frame started
                break
            packets.append(packet)
            if packet.marker or not self._is_video:
                break
        else:
            return None
        self.remove(len(packets))
        return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)


def release_frames_at_once(pc: RTCPeerConnection, track) -> bool:
    """Let the receiver of `track` (a track `pc` receives, before its first packet) hand each frame over as soon as it
    is whole (`FrameAtOnceJitterBuffer`): 80 ms less on every audio packet, 40 ms on every video frame
    (`letstalk bench --webrtc` measured both). The server's engine keeps its own pace and deadlines; an application
    that plays the SDK's media has its own output buffer. aiortc has no setting for it: this replaces the receiver's
    private buffer, and where a version has none (or it already holds packets) leaves the receiver as it is
    (False)."""
    for receiver in pc.getReceivers():
        if track is not None and receiver.track is track:
            buffer = getattr(receiver, JITTER_BUFFER, None)
            if (type(buffer) is JitterBuffer and getattr(buffer, "_origin", 0) is None
                    and isinstance(getattr(buffer, "_is_video", None), bool)):
                setattr(receiver, JITTER_BUFFER,
                        FrameAtOnceJitterBuffer(capacity=buffer.capacity, is_video=buffer._is_video))
                return True
    return False
