//! What the netlink lookups share: a socket whose receive gives up, and the messages of one
//! datagram.

use std::{io, os::fd::AsRawFd, time::Duration};

use netlink_packet_core::{DecodeError, NetlinkDeserializable, NetlinkMessage};
use netlink_sys::Socket;

/// How long one netlink receive may wait for the kernel.
pub(crate) const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// A netlink socket of `protocol`, bound and connected to the kernel, each receive bounded by
/// [`RECV_TIMEOUT`]. It answers for the network namespace of the thread that made it.
pub(super) fn open(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a properly sized timeval on a socket we own.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Why no whole datagram came.
pub(super) enum NotReceived {
    /// Nothing within [`RECV_TIMEOUT`].
    Timeout,
    Failed(io::Error),
    /// The datagram was longer than the buffer: its tail is lost.
    Truncated(DecodeError),
}

/// The next datagram, into `buf` (emptied first, its capacity the most taken).
pub(super) fn receive(socket: &Socket, buf: &mut Vec<u8>) -> Result<(), NotReceived> {
    buf.clear();
    let len = match socket.recv(buf, libc::MSG_TRUNC) {
        Ok(len) => len,
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            return Err(NotReceived::Timeout);
        }
        Err(e) => return Err(NotReceived::Failed(e)),
    };
    if len > buf.len() {
        return Err(NotReceived::Truncated(DecodeError::from(format!(
            "answer of {len} bytes truncated to {}",
            buf.len()
        ))));
    }
    Ok(())
}

/// The netlink messages of one datagram.
pub(super) fn messages<T: NetlinkDeserializable>(
    mut buf: &[u8],
) -> Result<Vec<NetlinkMessage<T>>, DecodeError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let message = NetlinkMessage::<T>::deserialize(buf)?;
        // Messages are padded to 4 bytes.
        let len = (message.header.length as usize).next_multiple_of(4);
        out.push(message);
        if len == 0 || len >= buf.len() {
            break;
        }
        buf = &buf[len..];
    }
    Ok(out)
}
