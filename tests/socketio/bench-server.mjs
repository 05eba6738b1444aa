// The Node.js reference of the `socketio` benchmark group: socket.io 4 (the original's
// stack) relaying the same messages as our server, storing nothing, as the original
// relayed them without Redis: each `message` goes to its recipient's connections (a
// socket.io room per user) or to a room's members, then `message_ack` goes to the
// sender; `join_room` answers `room_joined`. The user comes from `auth.userId` (no JWT:
// connecting is not what is measured). Prints `addr=127.0.0.1:PORT`; stops when stdin
// closes.
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const http = createServer();
const io = new Server(http, { pingInterval: 30000, pingTimeout: 30000, maxHttpBufferSize: 1 << 20 });
io.on('connection', (socket) => {
  const user = String(socket.handshake.auth?.userId ?? 'anonymous');
  socket.join(`user:${user}`);
  socket.emit('connected', { connectionId: socket.id, serverTime: new Date().toISOString() });
  socket.on('message', (data) => {
    if (!data || typeof data !== 'object' || !data.type) {
      socket.emit('error', { error: 'invalid message', code: 'INVALID_REQUEST' });
      return;
    }
    const message = {
      messageId: data.messageId ?? randomUUID(),
      type: data.type,
      interactionClass: data.interactionClass ?? 'CLASS_C',
      tenantId: 'bench',
      senderId: user,
      recipientId: data.recipientId,
      roomId: data.roomId,
      payload: data.payload,
      timestamp: new Date().toISOString(),
    };
    if (data.recipientId) {
      socket.to(`user:${data.recipientId}`).to(`user:${user}`).emit('message', message);
    } else if (data.roomId) {
      socket.to(data.roomId).emit('message', message);
    }
    socket.emit('message_ack', { messageId: message.messageId });
  });
  socket.on('join_room', (data) => {
    socket.join(data.roomId);
    socket.emit('room_joined', { roomId: data.roomId });
  });
});
http.listen(0, '127.0.0.1', () => {
  console.log(`addr=127.0.0.1:${http.address().port}`);
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
