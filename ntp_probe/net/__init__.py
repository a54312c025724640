"""The only I/O: datagram sockets, name resolution, the kernel clock syscall."""
