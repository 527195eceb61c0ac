//! The gRPC codec of the generated client and server: prost encoding with
//! small initial buffers.
//!
//! tonic gives every call an encode buffer and a decode buffer of 8 KiB.
//! A registry keeps one Heartbeat stream open per agent, so those two
//! buffers are most of its memory per agent, while a heartbeat message is
//! under 100 bytes. The buffers here start at [`BUFFER_BYTES`] and grow
//! when a larger message needs it, as tonic's do.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of each call's encode and decode buffer.
pub const BUFFER_BYTES: usize = 1024;

/// Encoded bytes after which a streaming encoder yields to the transport;
/// tonic's default.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec whose buffers start at [`BUFFER_BYTES`].
#[derive(Debug, Clone, Copy)]
pub struct RegistryCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for RegistryCodec<T, U> {
    fn default() -> Self {
        RegistryCodec { _messages: PhantomData }
    }
}

impl<T, U> Codec for RegistryCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffer_settings())
    }
}

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}
