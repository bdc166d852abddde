//! `SocketAddr` to and from the kernel's `sockaddr_storage`, and the few socket calls the
//! test clients share.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

/// A libc return value as a `Result`, with errno on failure.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `getsockname()`.
pub fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value of it.
    let mut raw: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: raw and len describe a buffer large enough for any address.
    check(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut raw as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    from_raw(&raw).ok_or_else(|| io::Error::other("unknown address family"))
}

pub fn to_raw(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

pub fn from_raw(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    let ptr = (storage as *const libc::sockaddr_storage).cast::<u8>();
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*ptr.cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*ptr.cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

/// An IPv4 TCP socket.
pub fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: the fd was just returned by socket() and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt(2)` with a value of type `T`.
pub fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a valid T for the length given.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A socket bound to 127.0.0.1 at `port` (0: an ephemeral one); listening if `backlog` is
/// given.
pub fn bound_loopback(port: u16, backlog: Option<i32>) -> io::Result<(OwnedFd, SocketAddr)> {
    let fd = tcp_socket()?;
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1 as &libc::c_int)?;
    let (raw, len) = to_raw(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
    // SAFETY: raw/len describe a valid sockaddr_in.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    if let Some(backlog) = backlog {
        // SAFETY: plain syscall on an fd we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    }
    let addr = local_addr(&fd)?;
    Ok((fd, addr))
}

/// Accepts and closes connections until `stop` is set and the listener is shut down (which
/// wakes a blocked accept); returns how many it accepted.
pub fn accept_and_close(listener: &OwnedFd, stop: &AtomicBool) -> u64 {
    let mut accepted = 0;
    loop {
        // SAFETY: plain syscall; a returned fd is owned and closed right away.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept() just returned this fd; nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            accepted += 1;
        } else if stop.load(Relaxed) {
            return accepted;
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::EMFILE) {
            // Out of descriptors: let the closes catch up rather than spin.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for addr in ["127.0.0.1:8080", "[::1]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let (raw, _) = to_raw(addr);
            assert_eq!(from_raw(&raw), Some(addr));
        }
    }
}
