#include <cstdio>
int main() { std::puts("specache: under construction"); return 0; }
