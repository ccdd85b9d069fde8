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
