//! Accepted connections that answer without Nagle or delayed-ACK stalls.
//!
//! The `kurrentdb` client does not set `TCP_NODELAY`, and it writes a
//! request's HTTP/2 frames in more than one segment. With Nagle's algorithm
//! on the client, its second segment waits for the server to acknowledge
//! the first, and Linux delays that ACK by up to 40 ms: about 90 ms per call
//! were measured on loopback. So the server acknowledges at once
//! (`TCP_QUICKACK`, which the kernel clears again after a while, hence set
//! after every read) and sends without delay (`TCP_NODELAY`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The listener's connections, each wrapped in [`QuickAck`].
pub(crate) fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<QuickAck>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(QuickAck(stream))
    })
}

/// A TCP connection that acknowledges every segment it reads at once.
#[derive(Debug)]
pub(crate) struct QuickAck(TcpStream);

impl QuickAck {
    fn acknowledge_at_once(&self) {
        #[cfg(target_os = "linux")]
        {
            // Best effort: a failure only costs latency.
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.0).poll_read(cx, buf);
        if result.is_ready() {
            self.acknowledge_at_once();
        }
        result
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl Connected for QuickAck {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}
