//! The listening sockets of the device gateways.
//!
//! `std::net::TcpListener::bind` asks the kernel for an accept queue of 128. A fleet
//! that connects at once (every device after a gateway restart, a provisioning wave)
//! overflows it: Linux then drops the SYNs it has no room for, and each of those
//! devices waits for its TCP retransmission, 1 s and then 3 s later, before the gateway
//! even sees it. The gateways bind with [`ACCEPT_BACKLOG`] instead (the kernel caps it
//! at `net.core.somaxconn`, 4,096 by default since Linux 5.4).

use std::net::SocketAddr;

/// The accept queue asked of the kernel for every device listener and the HTTP API.
pub const ACCEPT_BACKLOG: u32 = 4096;

/// A non-blocking TCP listener on `addr` (with `SO_REUSEADDR`, like std's) whose
/// accept queue is [`ACCEPT_BACKLOG`].
pub fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(ACCEPT_BACKLOG as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Connections the listener queues before anything accepts them: with std's
    /// backlog of 128 the 130th would wait for a SYN retransmission (1 s) and time out.
    #[test]
    fn a_burst_of_connections_is_queued_without_waiting_for_accept() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let n = 500.min(somaxconn.saturating_sub(1));
        if n <= 200 {
            eprintln!("SKIPPED: net.core.somaxconn is {somaxconn}; the kernel would cap any backlog below this test");
            return;
        }
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut open = Vec::with_capacity(n);
        for i in 0..n {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => open.push(s),
                Err(e) => panic!("connection {i} of {n} was not queued: {e}"),
            }
        }
        // Every one of them is there to accept.
        listener.set_nonblocking(false).unwrap();
        for _ in 0..n {
            listener.accept().unwrap();
        }
    }
}
