//! The protobuf codec of the LDC services: tonic's prost codec, except that a request body
//! that does not decode is INVALID_ARGUMENT (the caller sent garbage; retrying it will not
//! help) with a message saying so, rather than tonic's INTERNAL (which reads as our fault).

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct LdcCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for LdcCodec<T, U> {
    fn default() -> Self {
        LdcCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for LdcCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LdcDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LdcDecoder(self.0.decoder())
    }
}

#[derive(Debug)]
pub struct LdcDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for LdcDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            Status::invalid_argument(format!(
                "malformed message: the body is not a valid {} ({}); send the message the .proto defines",
                std::any::type_name::<U>().rsplit("::").next().unwrap_or("message"),
                s.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
