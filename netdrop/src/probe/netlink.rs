//! A blocking `NETLINK_ROUTE` socket: requests with their replies collected, link dumps, and
//! namespace ids. Used by the tc attachment (clsact filters) and the interface watchers.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::LinkMessage,
    nsid::{NsidAttribute, NsidMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A blocking `NETLINK_ROUTE` socket in the namespace of the thread that opened it.
pub struct RouteSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl RouteSocket {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Error replies without the whole request echoed back.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and collects the replies up to the ACK or the end of the dump.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let n = recv(&self.sock, &mut self.buf)?;
            let mut offset = 0;
            while offset < n {
                let bytes = &self.buf[offset..n];
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                offset += len.max(16).next_multiple_of(4);
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every link of the namespace.
    pub fn dump_links(&mut self) -> io::Result<Vec<LinkMessage>> {
        let replies = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// The id this namespace gives the namespace behind `fd`; `None` when it has none yet.
    pub fn nsid_of(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
        let mut msg = NsidMessage::default();
        msg.attributes.push(NsidAttribute::Fd(fd.as_raw_fd() as u32));
        let replies = self.request(RouteNetlinkMessage::GetNsId(msg), 0)?;
        for r in replies {
            if let RouteNetlinkMessage::NewNsId(m) = r {
                for a in m.attributes {
                    if let NsidAttribute::Id(id) = a {
                        return Ok((id >= 0).then_some(id));
                    }
                }
            }
        }
        Ok(None)
    }
}

fn recv(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut slice = &mut buf[..];
        match sock.recv(&mut slice, 0) {
            Ok(n) => return Ok(n.min(buf.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Receives one datagram of link events into `buf` (see `source::interfaces`).
pub(crate) fn recv_datagram(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    recv(sock, buf)
}
