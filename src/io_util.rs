//! Small helpers over monoio's owned-buffer I/O.

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

/// Reads more bytes onto the end of `buf` (monoio reads at the start of a
/// buffer unless given a slice), growing it to at least `min_spare` free bytes.
pub async fn read_append<S: AsyncReadRent>(
    stream: &mut S,
    mut buf: BytesMut,
    min_spare: usize,
) -> (std::io::Result<usize>, BytesMut) {
    buf.reserve(min_spare);
    let len = buf.len();
    let (res, slice) = stream.read(buf.slice_mut(len..)).await;
    (res, slice.into_inner())
}

/// Runs a future, turning a panic inside it into `Err` instead of letting it
/// unwind through the shard's runtime (which would take every session on
/// the shard down with it).
pub struct CatchUnwind<F>(pub std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}
