// The original README's client example ("WebSocket Client Connection"), unchanged:
// readme-example.test.mjs runs it with only the URL and the token filled in.
import io from 'socket.io-client';

const socket = io('http://localhost:3000', {
  auth: {
    token: 'your-jwt-token'
  },
  query: {
    clientId: 'unique-client-id'
  }
});

socket.on('connected', (data) => {
  console.log('Connected:', data);
});

socket.on('message', (message) => {
  console.log('Received message:', message);
});

// Send message
socket.emit('message', {
  type: 'chat.message',
  recipientId: 'user-123',
  payload: {
    text: 'Hello, World!'
  }
});
