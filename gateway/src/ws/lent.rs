//! Relay read buffers lent per read instead of owned per session.
//!
//! An idle WebSocket session spends its life waiting for a read on each side. With a buffer
//! owned per direction it would hold two `websocket.buffer_bytes` buffers (8 KiB by default)
//! while doing nothing, half of the 16 KiB budget per idle session. [`read_lent`] instead
//! takes a buffer from a small per-thread pool on each poll and gives it back when the read
//! is not ready: `AsyncRead::poll_read` returns `Pending` only when it put no bytes into the
//! buffer (the contract `tokio::io::copy` relies on as well), so nothing can be lost. A
//! session holds a buffer only from the moment bytes are in hand until the caller has
//! written them and drops the [`Lent`].
//!
//! The pool keeps at most [`KEEP`] buffers per worker thread; more are freed, so its memory
//! is bounded by `threads × KEEP × buffer_bytes` (2 × 64 × 4 KiB by default) whatever the
//! number of sessions.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Buffers kept per thread for reuse.
pub const KEEP: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of exactly `size` bytes: the pool's if it has one of that size, else new.
fn take(size: usize) -> Box<[u8]> {
    POOL.with_borrow_mut(|pool| match pool.pop() {
        Some(b) if b.len() == size => b,
        // A buffer of another size (the size is fixed per relay; only tests mix sizes) is
        // dropped rather than kept.
        _ => vec![0u8; size].into_boxed_slice(),
    })
}

fn give(buf: Box<[u8]>) {
    POOL.with_borrow_mut(|pool| {
        if pool.len() < KEEP {
            pool.push(buf);
        }
    });
}

/// Buffers currently pooled on this thread (tests and diagnostics).
pub fn pooled() -> usize {
    POOL.with_borrow(Vec::len)
}

/// Bytes read by [`read_lent`]; the buffer goes back to the pool when this is dropped.
/// Derefs to the bytes read (empty at end of stream).
pub struct Lent {
    buf: Option<Box<[u8]>>,
    len: usize,
}

impl Deref for Lent {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
            .as_deref()
            .and_then(|b| b.get(..self.len))
            .unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give(b);
        }
    }
}

/// Reads once from `r` (like `AsyncReadExt::read`) into a buffer of `size` bytes that is
/// held only while bytes are in hand. Cancel-safe: dropping the future loses nothing.
pub fn read_lent<R: AsyncRead + Unpin + ?Sized>(r: &mut R, size: usize) -> ReadLent<'_, R> {
    ReadLent { r, size }
}

/// The future of [`read_lent`] (a plain struct: it sits in every relay's session future).
pub struct ReadLent<'a, R: ?Sized> {
    r: &'a mut R,
    size: usize,
}

impl<R: AsyncRead + Unpin + ?Sized> Future for ReadLent<'_, R> {
    type Output = io::Result<Lent>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut buf = take(this.size);
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut *this.r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let len = rb.filled().len();
                Poll::Ready(Ok(Lent {
                    buf: Some(buf),
                    len,
                }))
            }
            Poll::Ready(Err(e)) => {
                give(buf);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                give(buf);
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiting_read_holds_no_buffer_and_bytes_arrive_whole() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let before = pooled();
        // Nothing to read yet: the read is polled (takes a buffer), is not ready and gives
        // the buffer back, so the pool holds one more than before while the read waits.
        let read = read_lent(&mut a, 16);
        tokio::pin!(read);
        assert!(
            tokio::time::timeout(Duration::from_millis(5), read.as_mut())
                .await
                .is_err()
        );
        assert_eq!(pooled(), before + 1, "the waiting read returned its buffer");
        tokio::io::AsyncWriteExt::write_all(&mut b, b"hello")
            .await
            .unwrap();
        let got = read.await.unwrap();
        assert_eq!(&*got, b"hello");
        assert_eq!(
            pooled(),
            before,
            "the buffer is out while the bytes are in hand"
        );
        drop(got);
        assert_eq!(
            pooled(),
            before + 1,
            "dropping the bytes returns the buffer"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn end_of_stream_and_sizes() {
        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        let got = read_lent(&mut a, 8).await.unwrap();
        assert!(got.is_empty());
        drop(got);
        // A read never returns more than the requested size, even from a pooled buffer of
        // another size.
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, &[7u8; 40])
            .await
            .unwrap();
        let got = read_lent(&mut a, 32).await.unwrap();
        assert_eq!(got.len(), 32);
        drop(got);
        let got = read_lent(&mut a, 32).await.unwrap();
        assert_eq!(&*got, &[7u8; 8]);
    }

    #[test]
    fn the_pool_is_bounded() {
        let lent: Vec<Lent> = (0..KEEP * 2)
            .map(|_| Lent {
                buf: Some(take(8)),
                len: 0,
            })
            .collect();
        drop(lent);
        assert_eq!(pooled(), KEEP);
    }
}
